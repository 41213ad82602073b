import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from tl_featureflow import SAEBank
from tl_featureflow.refs import hook_name
from tl_featureflow.saes.quality import BankQualityWarning, QualityReport, evaluate_bank
from tl_featureflow.synthetic import D_MODEL


def _sae(site, layer, W_enc, W_dec):
    sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=W_dec.shape[0],
                                        metadata=SAEMetadata(hook_name=hook_name(site, layer))))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_planted_perfect_and_useless_saes(tiny_model, tokens):
    eye = torch.eye(D_MODEL)
    perfect = _sae("mlp", 1, torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0))  # relu(x) - relu(-x) = x
    useless = _sae("res", 1, torch.cat([eye, -eye], 1), torch.zeros(2 * D_MODEL, D_MODEL))
    report = evaluate_bank(tiny_model, SAEBank({("mlp", 1): perfect, ("res", 1): useless}), tokens,
                           batch_size=1, loss_rows=2, progress=False)
    rows = {(r.site, r.layer): r for r in report.rows}
    good, bad = rows["mlp", 1], rows["res", 1]
    assert good.explained_variance == pytest.approx(1.0, abs=1e-6)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=hook_name("mlp", 1))
    x = cache[hook_name("mlp", 1)][:, 1:].reshape(-1, D_MODEL)
    never = torch.cat([~(x > 0).any(0), ~(x < 0).any(0)]).float().mean()  # sign never seen = feature dead
    assert good.l0 == pytest.approx(D_MODEL) and good.dead_fraction == pytest.approx(float(never))
    assert good.loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert bad.explained_variance < 0.01 and bad.loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert report.flagged() == [("res", 1)]
    lines = {line.split("|")[1].strip(): line for line in report.table().splitlines()[2:]}
    assert "(below floor)" in lines["1/res"] and "(below floor)" not in lines["1/mlp"]
    with pytest.warns(BankQualityWarning, match=r"1 of 2 SAEs explain less than 50%"):
        report.warn_if_flagged()
    assert QualityReport.from_dict(report.to_dict()).to_dict() == report.to_dict()
    assert report.median("explained_variance", "mlp") == pytest.approx(1.0, abs=1e-6)


def test_layer_local_loss_equals_a_full_forward(tiny_model, tokens):
    from tl_featureflow.saes.quality import _ce

    sae = _sae("att", 2, torch.randn(D_MODEL, 40), torch.randn(40, D_MODEL) * 0.1)
    report = evaluate_bank(tiny_model, SAEBank({("att", 2): sae}), tokens, loss_rows=2, progress=False)
    row = report.rows[0]

    def splice(act, hook):
        out = act.clone()
        out[:, 1:] = sae(act[:, 1:])
        return out

    with torch.no_grad():
        full = float(_ce(tiny_model.run_with_hooks(tokens[:2], fwd_hooks=[(hook_name("att", 2), splice)]), tokens[:2]))
        clean = float(_ce(tiny_model(tokens[:2]), tokens[:2]))
    assert row.ce_spliced == pytest.approx(full, rel=1e-5)
    assert row.ce_clean == pytest.approx(clean, rel=1e-6)


def test_the_report_says_when_a_bank_is_below_the_matching_knee(sae_factory):
    from tl_featureflow.saes.quality import MATCHING_KNEE, SAEQuality

    rows = [SAEQuality("res", 15, 0.9, 32.0, 0.01)]
    small = QualityReport(rows, meta={"training_tokens": 196_608})
    assert small.below_knee() and "Warning: these SAEs saw 196,608 training tokens" in small.table()
    large = QualityReport(rows, meta={"training_tokens": MATCHING_KNEE})
    assert not large.below_knee() and "Warning" not in large.table()
    assert not QualityReport(rows).below_knee()                    # unknown budget: no claim
    bank = SAEBank({("res", 1): sae_factory("res", 1)}, metadata={"quality": small.to_dict() | {"meta": {}},
                                                                  "training_tokens": 49_152})
    assert QualityReport.of_bank(bank).meta["training_tokens"] == 49_152
    assert QualityReport.of_bank(SAEBank({("res", 1): sae_factory("res", 1)})) is None

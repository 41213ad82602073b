"""Preflight (issue 27): an SAE on the wrong tensor is caught with its FVU; one on the right tensor passes.

Planted: layer 1's attention writes only through head 0 (the other heads' W_O are zero), so attn_out lives in
the 8-dim row space U of head 0's W_O. An SAE with decoder [U; -U] and encoder [U^T, -U^T] reconstructs any
vector of that space exactly (ReLU(x U^T) U - ReLU(-x U^T) U = x U^T U): FVU 0 on hook_attn_out, while the
same SAE on hook_mlp_out (full rank) loses most of the variance.
"""

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer

import tl_featureflow as ff
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.preflight import (
    ON_LOAD,
    PREFLIGHT_ENV,
    PREFLIGHT_TEXT,
    PreflightWarning,
    checks_on_load,
    preflight,
    preflight_tokens,
    weight_processing_mismatches,
)
from tl_featureflow.synthetic import D_MODEL, D_VOCAB, tiny_cfg


def _model_and_sae(hook: str):
    torch.manual_seed(0)
    model = HookedTransformer(tiny_cfg()).eval()
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.W_O[1:] = 0
        attn.b_O.zero_()
    basis = torch.linalg.qr(attn.W_O[0].detach().T)[0].T                           # [d_head, d_model], orthonormal
    sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=2 * basis.shape[0], metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([basis, -basis]))
        sae.W_enc.copy_(torch.cat([basis, -basis]).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return model, sae


def test_an_sae_on_its_site_passes_and_on_another_fails_with_its_fvu():
    tokens = torch.randint(0, D_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    model, sae = _model_and_sae(ff.hook_name("att", 1))
    good = preflight(model, SAEBank({("att", 1): sae}), tokens, on_fail="raise")
    assert good.rows[0].fvu < 1e-6 and not good.failed
    model, wrong = _model_and_sae(ff.hook_name("mlp", 1))
    bank = SAEBank({("att", 1): sae, ("mlp", 1): wrong})
    with pytest.warns(PreflightWarning, match=r"\('mlp', 1\) on blocks\.1\.hook_mlp_out: FVU \d+\.\d\d > 0\.9"):
        result = preflight(model, bank, tokens)
    assert [row.key for row in result.failed] == [("mlp", 1)]
    assert result.failed[0].fvu > 0.9 and "1 past FVU" in repr(result)
    with pytest.raises(ff.errors.ModelMismatchError, match="1 of 2 SAEs do not reconstruct"):
        preflight(model, bank, tokens, on_fail="raise")


def test_the_likely_cause_names_the_release_loading_kwargs():
    tokens = torch.randint(0, D_VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    model, wrong = _model_and_sae(ff.hook_name("mlp", 1))
    wrong.cfg.metadata.model_from_pretrained_kwargs = {"fold_ln": True}
    result = preflight(model, SAEBank({("mlp", 1): wrong}), tokens, on_fail="ignore")
    assert "fold_ln=True" in result.failed[0].cause and "normalization_type='LN'" in result.failed[0].cause
    with pytest.raises(ff.errors.InvalidArgumentError, match="max_fvu"):
        preflight(model, SAEBank({("mlp", 1): wrong}), tokens, max_fvu=float("nan"))


def test_a_release_trained_on_centred_weights_fails_on_an_uncentred_model_whatever_its_fvu():
    """GPT-2 ``res-jb`` says ``center_writing_weights=True``: on a model whose writes are not centred, the SAE
    fails the preflight even with FVU 0 (the planted exact SAE), naming the keyword; once the model is
    processed as the release loads it, it passes."""
    tokens = torch.randint(0, D_VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    model, sae = _model_and_sae(ff.hook_name("att", 1))
    sae.cfg.metadata.model_from_pretrained_kwargs = {"center_writing_weights": True}
    result = preflight(model, SAEBank({("att", 1): sae}), tokens, on_fail="ignore")
    row = result.rows[0]
    assert row.fvu < 1e-6 and not row.ok and row.cause == ""
    assert "center_writing_weights=True, this model's weights show center_writing_weights=False" in row.processing[0]
    with pytest.raises(ff.errors.ModelMismatchError, match=r"FVU 0\.00; its release loads the model with center_wr"):
        preflight(model, SAEBank({("att", 1): sae}), tokens, on_fail="raise")
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert ff.backend.backend_of(model).weight_processing() == {"fold_ln": True, "center_writing_weights": True}
    assert weight_processing_mismatches(model, sae, ff.hook_name("att", 1)) == []


def test_a_transcoder_trained_unfolded_is_flagged_on_a_folded_model_and_only_where_it_reads_a_norm():
    """``fold_ln`` changes ``ln2.hook_normalized`` (a transcoder's input), not the residual stream: a release
    that says ``fold_ln=False`` is flagged on a folded model for a normalized-input SAE only."""
    from types import SimpleNamespace

    model, _ = _model_and_sae(ff.hook_name("att", 1))
    sae = SimpleNamespace(cfg=SimpleNamespace(metadata=SimpleNamespace(model_from_pretrained_kwargs={"fold_ln": False})))
    normalized, resid = "blocks.1.ln2.hook_normalized", ff.hook_name("res", 1)
    assert weight_processing_mismatches(model, sae, normalized) == []                # unprocessed: LN, not folded
    model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    assert ff.backend.backend_of(model).weight_processing() == {"fold_ln": True, "center_writing_weights": False}
    found = weight_processing_mismatches(model, sae, normalized)
    assert len(found) == 1 and "fold_ln=False" in found[0] and "fold_ln=True" in found[0]
    assert weight_processing_mismatches(model, sae, resid) == []                      # the stream itself: unchanged
    sae.cfg.metadata.model_from_pretrained_kwargs = {}                                # the release says nothing
    assert weight_processing_mismatches(model, sae, normalized) == []


# ------------------------------------------------------------------------------ automatic preflight on load
# A fake hub serves GPT-2 res-jb's SAELens format (cfg.json + safetensors written by SAELens's save_model) to
# SAELens's real loader. blocks.1.hook_resid_pre gets an exact SAE (decoder [I; -I], encoder [I, -I]: ReLU(x) -
# ReLU(-x) = x, FVU 0 on any tensor); blocks.2.hook_resid_pre one trained where its tensor was 4 times smaller
# (it writes 4x what it reads: FVU >= 9, the "near 10" of the sandwich-norm trap).
GOOD, WRONG = "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"


def _exact_sae(hook: str, scale: float = 1.0) -> StandardSAE:
    eye = torch.eye(D_MODEL)
    sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=2 * D_MODEL, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]) * scale)
        sae.W_enc.copy_(torch.cat([eye, -eye]).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture
def pretrained(tmp_path, monkeypatch):
    """``pretrained(ids)``: ``SAEBank.from_pretrained("gpt2-small-res-jb", ids)`` served offline."""
    import sae_lens.loading.pretrained_sae_loaders as loaders
    from huggingface_hub.utils import EntryNotFoundError

    served = {GOOD: _exact_sae(GOOD), WRONG: _exact_sae(WRONG, scale=4.0)}

    def fake_download(repo_id, filename, subfolder=None, **kw):
        folder, _, name = filename.rpartition("/")
        root = tmp_path / repo_id / folder
        if not root.exists():
            served[folder].save_model(root)
        if not (root / name).exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(root / name)

    monkeypatch.setattr(loaders, "hf_hub_download", fake_download)
    monkeypatch.delenv(PREFLIGHT_ENV, raising=False)
    return lambda ids: SAEBank.from_pretrained("gpt2-small-res-jb", ids, progress=False)


def _flow_model() -> ff.FlowTransformer:
    torch.manual_seed(0)
    return ff.FlowTransformer.from_hooked(HookedTransformer(tiny_cfg()).eval())


@pytest.fixture
def calls(monkeypatch):
    """The SAE keys of every preflight() the automatic check runs, call by call."""
    from tl_featureflow.saes import preflight as module

    seen: list[list] = []
    real = module.preflight

    def counting(model, bank, tokens, **kw):
        seen.append(list(bank))
        return real(model, bank, tokens, **kw)

    monkeypatch.setattr(module, "preflight", counting)
    return seen


WARNING = (r"(?s)automatic preflight.*315 random token ids.*SAE 'gpt2-small-res-jb' 'blocks\.2\.hook_resid_pre' at "
           r"\('res', 1\) on blocks\.1\.hook_resid_post: FVU (9|\d\d+)\.\d\d > 0\.9 \(.*"
           r"preflight=False")


def test_a_pretrained_bank_with_an_sae_on_the_wrong_tensor_warns_with_its_fvu_on_attach_and_on_flowtracer(
        pretrained, calls):
    bank = pretrained([GOOD, WRONG])
    assert list(bank) == [("res", 0), ("res", 1)] and checks_on_load(bank)
    model = _flow_model()
    with pytest.warns(PreflightWarning, match=WARNING) as record:
        model.attach(bank)
    assert len(record) == 1 and "('res', 0)" not in str(record[0].message)       # the exact SAE passes
    assert model.bank is bank                                                      # warned, attached all the same
    model.detach()
    with pytest.warns(PreflightWarning, match=WARNING):
        ff.FlowTracer(bank, _flow_model(), contexts=None)                          # another model: checked again
    with pytest.warns(PreflightWarning, match=WARNING):
        ff.FlowTracer(bank, HookedTransformer(tiny_cfg()).eval(), contexts=None)   # a plain HookedTransformer too
    assert calls == [[("res", 0), ("res", 1)]] * 3


def test_validate_runs_it_too_and_every_entry_point_opts_out(pretrained, calls, monkeypatch):
    bank = pretrained([GOOD, WRONG])
    model = _flow_model()
    tokens = torch.randint(0, D_VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    tracer = ff.FlowTracer(bank, model, contexts=None, preflight=False)
    model.attach(bank, preflight=False)
    model.detach()
    with model.attached(bank, preflight=False):
        pass
    kwargs = dict(layers=[1], methods=["top1"], max_targets=2, positions_per_text=1, progress=False)
    ff.validate(tracer, model, tokens, preflight=False, **kwargs)
    monkeypatch.setenv(PREFLIGHT_ENV, "0")
    model.attach(bank)
    model.detach()
    ff.FlowTracer(bank, _flow_model(), contexts=None)
    assert calls == []                                          # nothing ran, nothing warned
    monkeypatch.setenv(PREFLIGHT_ENV, "1")
    with pytest.warns(PreflightWarning, match=WARNING):
        ff.validate(tracer, model, tokens, **kwargs)
    assert calls == [[("res", 0), ("res", 1)]]


def test_the_check_runs_once_per_sae_and_model_and_the_mark_survives_select_bind_save_load(
        pretrained, calls, tmp_path):
    bank = pretrained([GOOD])                                   # a correct bank: no warning (warnings are errors)
    assert bank.metadata["preflight"] == ON_LOAD and bank.metadata["sae_ids"] == {"0/res": ["gpt2-small-res-jb", GOOD]}
    model = _flow_model()
    for _ in range(2):
        model.attach(bank)
        model.detach()
    ff.FlowTracer(bank, model, contexts=None)
    ff.FlowTracer(bank.select(layers=[0]), model, contexts=None)          # the same SAE objects
    ff.FlowTracer(bank, ff.FlowTransformer.from_hooked(model, fast_path=False), contexts=None)   # shared weights
    assert len(calls) == 1
    loaded = SAEBank.load(bank.save(tmp_path / "bank"))
    for kept in (bank.select(sites=["res"]), bank.bind(model), loaded):
        assert checks_on_load(kept)
    model.attach(loaded)                                       # new SAE objects: checked once on this model
    model.detach()
    model.attach(loaded)
    model.detach()
    assert len(calls) == 2


def test_banks_built_from_objects_or_trained_here_are_not_checked(calls):
    wrong = _exact_sae(WRONG, scale=4.0)
    bank = SAEBank({("res", 1): wrong})
    assert not checks_on_load(bank)
    model = _flow_model()
    model.attach(bank)
    model.detach()
    ff.FlowTracer(bank, model, contexts=None)
    assert calls == []
    marked = SAEBank({("res", 1): wrong}, metadata={"preflight": ON_LOAD})      # a bank of your own, opted in
    with pytest.warns(PreflightWarning, match=r"\('res', 1\) on blocks\.1\.hook_resid_post: FVU"):
        model.attach(marked)
    model.detach()
    assert not checks_on_load(SAEBank({("res", 1): wrong}, metadata={"source": "sae_lens.from_pretrained",
                                                                      "preflight": "off"}))


def test_preflight_tokens_come_from_the_tokenizer_or_a_fixed_generator(tmp_path):
    from tl_featureflow.synthetic import byte_tokenizer

    model = HookedTransformer(tiny_cfg()).eval()
    tokens, source = preflight_tokens(model)
    assert tokens.shape == (5, 64) and torch.equal(tokens, preflight_tokens(model)[0]) and "random" in source
    model = HookedTransformer(tiny_cfg(d_vocab=300)).eval()
    model.tokenizer = byte_tokenizer(tmp_path / "tok")
    tokens, source = preflight_tokens(model, 100)
    assert tokens.shape == (2, 64) and bool((tokens[:, 0] == model.tokenizer.bos_token_id).all())
    assert "built-in text" in source and model.tokenizer.decode(tokens[0, 1:11]) == PREFLIGHT_TEXT[:10]

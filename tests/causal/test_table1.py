"""Table 1 the paper's way: its target set and methods, Pearson from a stream, the exact pre-activation split."""

import numpy as np
import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.causal import experiment
from tl_featureflow.causal.attribution import model_activations, split_at, split_preactivations
from tl_featureflow.causal.pearson import pearson_matches
from tl_featureflow.causal.protocol import table1_markdown
from tl_featureflow.causal.results import ValidationReport, ValidationRow
from tl_featureflow.synthetic import D_VOCAB
from tl_featureflow.viz.html import _table1_tables


@pytest.fixture
def text():
    return torch.randint(0, D_VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))


def test_the_split_sums_exactly_to_the_saes_own_preactivation(tiny_model, text, bank_factory):
    bank = bank_factory(arch="jumprelu")
    flow = ff.FlowTransformer.from_hooked(tiny_model)
    raw = model_activations(flow, text, 2)
    torch.testing.assert_close(raw["target"], raw["res"] + raw["att"] + raw["mlp"], rtol=0, atol=1e-5)
    sae = bank["res", 2]
    _, cache = sae.run_with_cache(raw["target"][6])
    own_pre = cache["hook_sae_acts_pre"].detach()                     # SAELens's hidden_pre, by its own hook
    targets = list(range(bank.d_sae("res", 2)))
    split = split_preactivations(tiny_model, bank, text, layer=2, position=6, targets=targets)
    torch.testing.assert_close(split.pre, own_pre.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(split.total(), split.pre, rtol=0, atol=1e-4)
    # by hand: each active feature j of a site contributes a_j * (W_dec[j] . W_enc[:, i])
    mlp = bank["mlp", 2]
    a = mlp.encode(raw["mlp"][6]).detach()
    j = int(a.argmax())
    by_hand = float(a[j]) * float(mlp.W_dec[j].detach() @ sae.W_enc[:, 5].detach())
    row = int((split.indices["mlp"] == j).nonzero()[0, 0])
    assert float(split.features["mlp"][row, 5]) == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
    # the best contributor is the argmax of every active feature's contribution over all sites
    sites, indices = split.best()
    for t in (0, 5, 9):
        everything = [(float(c[r, t]), site, int(split.indices[site][r])) for site, c in split.features.items()
                      for r in range(c.shape[0])]
        _, site, index = max(everything)
        assert (sites[t], indices[t]) == (site, index)
    # a site missing from the bank counts whole as its error
    partial = split_at(bank_factory(sites=("res", "mlp"), arch="jumprelu"), raw, 2, 6, targets)
    torch.testing.assert_close(partial.total(), partial.pre, rtol=0, atol=1e-4)
    assert partial.features["att"].shape[0] == 0


def test_split_preactivations_takes_every_form_of_a_feature(tiny_model, text, bank_factory):
    bank = bank_factory(arch="jumprelu")
    by_index = split_preactivations(tiny_model, bank, text, layer=2, position=6, targets=[3, 5])
    by_ref = split_preactivations(tiny_model, bank, text, layer=2, position=6,
                                  targets=["2/res/3", ff.FeatureRef(2, "res", 5)])
    torch.testing.assert_close(by_ref.pre, by_index.pre, rtol=0, atol=0)


@pytest.mark.parametrize(("targets", "message"), [
    (["2/mlp/3"], "not a res.2. feature"), (["1/res/3"], "not a res.2. feature"), ([-1], "indices in"),
    ([10**6], "indices in"), ([], "at least one"), ([True], "indices in"), (["2-res-3"], "cannot parse")])
def test_split_preactivations_names_bad_targets(tiny_model, text, bank_factory, targets, message):
    bank = bank_factory(arch="jumprelu")
    with pytest.raises(ff.FeatureFlowError, match=message):
        split_preactivations(tiny_model, bank, text, layer=2, position=6, targets=targets)


def test_exhaustive_single_picks_the_one_feature_that_carries_the_target(tiny_model, text, monkeypatch, bank_factory):
    """Two active predecessors at different sites; removing either alone leaves the target active,
    but removing the res one takes it much lower: the paper's exhaustive search picks that one
    feature, the per-site exhaustive removes one per site (both)."""
    bank = bank_factory()
    flow = ff.FlowTransformer.from_hooked(tiny_model)
    _, feats = flow.run_with_features(text, bank=bank, return_logits=False)
    pos = 5
    target = int(feats["res", 2][0, pos].argmax())
    a_res = int(feats["res", 1][0, pos].argmax())
    b_mlp = int(feats["mlp", 2][0, pos].argmax())
    z = float(feats["res", 2][0, pos, target])

    def planted(model, bank_, text_, layer, positions, plans, chunk_rows=16, entering=None):
        rows = []
        for plan in plans:
            (item,) = plan
            acts = feats["res", 2][0, pos].clone()
            carried = {("res", a_res): 0.2, ("mlp", b_mlp): 0.9}.get((item.site, item.features[0]), 0.99)
            acts[target] = z * carried                     # every removal leaves it active, one nearly off
            rows.append(acts)
        return torch.stack(rows)

    monkeypatch.setattr(experiment, "res_activations", planted)
    pred_keys = {"res": ("res", 1), "mlp": ("mlp", 2), "att": ("att", 2)}
    best = experiment._exhaustive_choices(flow, bank, text, 2, [pos], pred_keys, feats, 16)
    assert best[(pos, "search", target)] == ("res", a_res)
    assert int(best[(pos, "res")][target]) == a_res and int(best[(pos, "mlp")][target]) == b_mlp
    run = experiment._Experiment(ff.FlowTracer(bank), flow, [2], ["exhaustive", "exhaustive_single"], [0.0],
                                 ["top1"], 25, 16, 0, torch.Generator().manual_seed(0))
    single = run.active_predecessors("exhaustive_single", 2, pos, target, feats, best)
    per_site = run.active_predecessors("exhaustive", 2, pos, target, feats, best)
    assert single == {"res": [a_res]}
    assert per_site["res"] == [a_res] and per_site["mlp"] == [b_mlp]


def test_validate_runs_the_new_methods_and_records_attributions(tiny_model, bank_factory):
    bank = bank_factory(arch="jumprelu")
    tokens = torch.randint(0, D_VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    report = ff.validate(ff.FlowTracer(bank), tiny_model, tokens, layers=[2],
                         methods=("top1", "exhaustive", "exhaustive_single", "attribution"), progress=False)
    single = [r for r in report.rows if r.method in ("exhaustive_single", "attribution")]
    assert single and all(len(r.deactivated) == 1 for r in single)
    assert any(len(r.deactivated) > 1 for r in report.rows if r.method == "exhaustive")
    assert report.attributions
    for record in report.attributions:
        parts = record["constant"] + sum(record[f"{s}_total"] for s in ("res", "att", "mlp"))
        assert parts == pytest.approx(record["pre"], abs=1e-4)
        for site in ("res", "att", "mlp"):
            assert 0 <= record[f"{site}_top1_rank"] <= record[f"{site}_active"]
            assert record["best_contribution"] >= record[f"{site}_top1_contribution"] - 1e-9
            assert (record[f"{site}_top1_rank"] == 0) == (record[f"{site}_top1_contribution"] == 0.0)
    # the attribution row removes the recorded best contributor
    best = {(a["text"], a["position"], a["target"]): a["best"] for a in report.attributions}
    for row in (r for r in report.rows if r.method == "attribution"):
        site, index = best[(row.text, row.position, row.target)].split(":")
        layer = 1 if site == "res" else 2
        assert row.deactivated == [f"{layer}/{site}/{index}"]
    again = ValidationReport.load(report.save(ff.embedded.cache_root() / "t1.json"))
    assert again.attributions == report.attributions


def test_pearson_from_a_stream_equals_a_by_hand_computation(tiny_model, bank_factory):
    bank = bank_factory()
    stream = torch.randint(0, D_VOCAB, (6, 10), generator=torch.Generator().manual_seed(9))
    matches = pearson_matches(tiny_model, bank, [2], tokens=stream, batch_size=4, progress=False)
    _, feats = ff.FlowTransformer.from_hooked(tiny_model).run_with_features(stream, bank=bank)
    y = feats["res", 2][:, 1:].reshape(-1, bank.d_sae("res", 2)).double().numpy()
    for site, key in (("res", ("res", 1)), ("mlp", ("mlp", 2)), ("att", ("att", 2))):
        x = feats[key][:, 1:].reshape(-1, bank.d_sae(*key)).double().numpy()
        for i in range(y.shape[1]):
            if y[:, i].std() == 0:
                assert int(matches[(2, site)][i, 0]) == -1
                continue
            corr = np.array([np.corrcoef(x[:, j], y[:, i])[0, 1] if x[:, j].std() > 0 else -np.inf
                             for j in range(x.shape[1])])
            assert int(matches[(2, site)][i, 0]) == int(np.nanargmax(corr)), (site, i)
    streamed = pearson_matches(tiny_model, bank, [2], tokens=(stream[i : i + 2] for i in range(0, 6, 2)),
                               progress=False)
    assert all(torch.equal(streamed[k], matches[k]) for k in matches)
    assert matches.meta["n_tokens"] == 6 * 9
    cached = pearson_matches(tiny_model, bank, [2], tokens=stream, progress=False)
    assert all(torch.equal(cached[k], matches[k]) for k in matches)
    report = ff.validate(ff.FlowTracer(bank), tiny_model, stream[:2], layers=[2], methods=("pearson",),
                         pearson=matches, progress=False)
    assert report.meta["pearson_source"]["n_tokens"] == 54


def test_table1_uses_the_same_single_site_targets_for_every_method():
    def row(target, method, group, z_new, text=0, pos=1):
        return ValidationRow(text, pos, target, method, group, 1.0, z_new, 0.0, ["x"])

    rows = [
        row("5/res/1", "top1", "RES", 0.0), row("5/res/1", "pearson", "MLP", 0.5),
        row("5/res/1", "exhaustive_single", "RES", 0.0), row("5/res/1", "exhaustive", "RES & MLP", 0.0),
        row("5/res/2", "top1", "RES & ATT", 0.0),                         # combined group: not in the set...
        row("5/res/2", "pearson", "ATT", 0.8), row("5/res/2", "exhaustive_single", "ATT", 0.0),   # ...unless pearson
        row("5/res/3", "top1", "RES & MLP", 0.0), row("5/res/3", "exhaustive_single", "MLP", 0.0),  # out
    ]
    report = ValidationReport(rows, meta={"r": 0.0})
    assert report.paper_targets() == [(0, 1, "5/res/1"), (0, 1, "5/res/2")]
    table = report.table1()
    assert table["top1"] == {"success_rate": 1.0, "activation_change": 1.0, "n": 2}
    assert table["pearson"]["n"] == 2 and table["pearson"]["success_rate"] == 0.0
    assert table["pearson"]["activation_change"] == pytest.approx((0.5 + 0.2) / 2)
    assert table["exhaustive_single"]["success_rate"] == 1.0
    assert "attribution" not in table                                  # not run
    missing = ValidationReport([r for r in rows if not (r.target == "5/res/2" and r.method == "exhaustive_single")],
                               meta={"r": 0.0}).table1()
    assert missing["exhaustive_single"] == {"success_rate": 0.5, "activation_change": 0.5, "n": 2}   # counted, failed
    by_group = report.table1(by_group=True)
    assert set(by_group) >= {"top1 / RES", "top1 / other"}


def test_live_only_matching_and_the_dead_share(tiny_model, text, bank_factory):
    bank = bank_factory()
    tracer = ff.FlowTracer(bank)
    top = tracer.match(("mlp", 2), ("res", 2), 1).indices[:, 0]
    alive = {key: torch.ones(bank.d_sae(*key), dtype=torch.bool) for key in bank}
    alive[("mlp", 2)][top[0]] = False                                  # res feature 0's top-1 mlp match is dead
    matches = experiment._method_matches(tracer, 2, "top1", 0, alive)
    assert int(matches["mlp"][0, 0]) != int(top[0])
    assert bool(alive[("mlp", 2)][matches["mlp"][:, 0]].all())
    by_hand = float((top == top[0]).float().mean())
    report = ff.validate(tracer, tiny_model, text, layers=[2], methods=("top1",), alive=alive, progress=False)
    assert report.meta["dead_top1"]["2"]["mlp"] == pytest.approx(by_hand)
    assert report.meta["dead_top1"]["2"]["res"] == 0.0


def test_table1_per_layer_splits_targets_by_their_own_layer():
    def row(target, method, group, z_new):
        return ValidationRow(0, 1, target, method, group, 1.0, z_new, 0.0, ["x"])

    rows = [row("5/res/1", "top1", "RES", 0.0), row("5/res/1", "exhaustive_single", "RES", 0.0),
            row("9/res/1", "top1", "MLP", 0.5), row("9/res/1", "exhaustive_single", "MLP", 0.0),
            row("9/res/2", "top1", "ATT", 1.0), row("9/res/2", "exhaustive_single", "ATT", 0.0)]
    counts = {"5": {"top1": {"RES": 1}}, "9": {"top1": {"MLP": 1, "ATT": 1}}}
    attributions = [{"target": "5/res/1"}, {"target": "9/res/2"}]
    report = ValidationReport(rows, counts, {"r": 0.0}, attributions)
    at9 = report.at_layers(9)
    assert {r.target for r in at9.rows} == {"9/res/1", "9/res/2"} and list(at9.group_counts) == ["9"]
    assert at9.attributions == [{"target": "9/res/2"}]
    assert at9.table1()["top1"] == {"success_rate": 0.0, "activation_change": pytest.approx(0.25), "n": 2}
    assert report.at_layers([5]).table1()["top1"] == {"success_rate": 1.0, "activation_change": 1.0, "n": 1}
    assert len(report.at_layers([5, 9]).rows) == len(rows) and len(report.rows) == 6     # the report is kept
    plain = ValidationReport(rows, counts, {"r": 0.0})
    assert "| top-1 cosine | 100.0% (1) | 0.0% (2) |" in table1_markdown(plain)
    page = "".join(_table1_tables(plain))
    assert "Per layer" in page and "layer 9" in page

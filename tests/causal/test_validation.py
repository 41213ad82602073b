"""Deactivation primitives: exact arithmetic, r = 1 identity, layer-local equals full forward."""

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.causal.interventions import Intervention, intervened, rescale, target_activations
from tl_featureflow.refs import hook_name
from tl_featureflow.synthetic import D_MODEL


def test_rescale_is_the_method_formula(sae_factory):
    sae = sae_factory("mlp", 1, d_sae=40, seed=2)
    h = torch.randn(2, 6, D_MODEL, generator=torch.Generator().manual_seed(0))
    out = rescale(h, sae, [3, 7], [1, 4], r=-2.0)
    a = sae.encode(h)[..., [3, 7]]
    expected = h.clone()
    expected[:, [1, 4]] += (-3.0) * (a[:, [1, 4]] @ sae.W_dec[[3, 7]].detach())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert torch.equal(out[:, [0, 2, 3, 5]], h[:, [0, 2, 3, 5]])
    assert rescale(h, sae, [3], [1], r=1.0) is h
    with pytest.raises(ff.FeatureFlowError, match="d_sae 40"):
        rescale(h, sae, [40], [1], r=0.0)
    with pytest.raises(ff.FeatureFlowError, match="positions"):
        rescale(h, sae, [1], [9], r=0.0)


def test_removing_a_feature_zeroes_it_when_the_sae_reconstructs_linearly(sae_factory):
    sae = sae_factory("res", 0, d_sae=48, seed=5)
    x = torch.randn(1, 3, D_MODEL, generator=torch.Generator().manual_seed(1))
    acts = sae.encode(x)
    index = int(acts[0, 1].argmax())
    edited = rescale(x, sae, [index], [1], r=0.0)
    # the feature's contribution a * v is gone from the input itself
    torch.testing.assert_close(edited[0, 1] + acts[0, 1, index] * sae.W_dec[index].detach(), x[0, 1], rtol=0,
                               atol=1e-5)


def _targets(flow, bank, tokens, layer):
    _, feats = flow.run_with_features(tokens, sites=["res"], layers=[layer], bank=bank, return_logits=False)
    acts = feats["res", layer][0]
    return [(pos, int(acts[pos].argmax())) for pos in (3, 5, 8)]


@pytest.mark.parametrize("r", [0.0, -1.0, 2.5])
def test_layer_local_batched_equals_full_forward(tiny_model, r, bank_factory):
    flow = ff.FlowTransformer.from_hooked(tiny_model)
    bank = bank_factory()
    tokens = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(7))
    targets = _targets(flow, bank, tokens, 2)
    plans = [
        [Intervention("res", 1, (4, 9), (3,), r)],
        [Intervention("mlp", 2, (1,), (5,), r), Intervention("att", 2, (2, 3), (5, 4), r)],
        [Intervention("att", 2, (0,), (8,), r), Intervention("res", 1, (11,), (8,), r)],
    ]
    local = target_activations(flow, bank, tokens, 2, targets, plans)
    full = target_activations(flow, bank, tokens, 2, targets, plans, layer_local=False)
    torch.testing.assert_close(local, full, rtol=0, atol=1e-5)
    untouched = target_activations(flow, bank, tokens, 2, targets, [[] for _ in targets])
    if r != 1.0:
        assert not torch.allclose(local, untouched)


def test_r_equal_one_changes_nothing_bit_for_bit(tiny_model, bank_factory):
    flow = ff.FlowTransformer.from_hooked(tiny_model)
    bank = bank_factory()
    tokens = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(8))
    targets = _targets(flow, bank, tokens, 1)
    clean = target_activations(flow, bank, tokens, 1, targets, [[] for _ in targets])
    same = target_activations(flow, bank, tokens, 1, targets,
                              [[Intervention("mlp", 1, (0, 1, 2), (3, 5, 8), 1.0)] for _ in targets])
    assert torch.equal(clean, same)
    logits = flow(tokens)
    with intervened(flow, bank, [Intervention("att", 0, (5,), (2,), 1.0)]):
        assert torch.equal(flow(tokens), logits)


def test_hooks_are_removed_after_an_exception(tiny_model, bank_factory, leftover_hooks):
    flow = ff.FlowTransformer.from_hooked(tiny_model)
    bank = bank_factory()
    with pytest.raises(RuntimeError, match="boom"):
        with intervened(flow, bank, [Intervention("res", 1, (0,), (1,), 0.0)]):
            assert flow.hook_dict[hook_name("res", 1)].fwd_hooks
            raise RuntimeError("boom")
    assert leftover_hooks() == []
    tokens = torch.randint(0, 64, (1, 10))
    with pytest.raises(ff.FeatureFlowError, match="cannot reach res"):
        target_activations(flow, bank, tokens, 2, [(1, 0)], [[Intervention("mlp", 1, (0,), (1,))]])
    assert leftover_hooks() == []


# ------------------------------------------------------------------------------ the protocol
@pytest.fixture
def planted_circuit(tiny_model):
    """Layer 1 computes nothing (attention and MLP outputs zeroed), so res(1) = res(0).

    The res SAEs of layers 0 and 1 are the same standard-basis dictionary (feature f
    reads and writes coordinate f), so every res(1) feature's true predecessor is the
    same-index res(0) feature, and removing it at a token zeroes the target exactly.
    """
    from tl_featureflow.synthetic import sae_from_decoder

    with torch.no_grad():
        for name in ("W_O", "b_O"):
            getattr(tiny_model.blocks[1].attn, name).zero_()
        for name in ("W_out", "b_out"):
            getattr(tiny_model.blocks[1].mlp, name).zero_()
    basis = torch.eye(D_MODEL)[:16]
    gen = torch.Generator().manual_seed(3)
    bank = ff.SAEBank({
        ("res", 0): sae_from_decoder("res", 0, basis),
        ("res", 1): sae_from_decoder("res", 1, basis),
        ("mlp", 1): sae_from_decoder("mlp", 1, torch.nn.functional.normalize(torch.randn(24, D_MODEL, generator=gen), dim=1)),
        ("att", 1): sae_from_decoder("att", 1, torch.nn.functional.normalize(torch.randn(24, D_MODEL, generator=gen), dim=1)),
    })
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(4))
    return tiny_model, bank, tokens


def test_planted_circuit_deactivation_matches_the_hand_computation(planted_circuit, tmp_path, leftover_hooks):
    from tl_featureflow.causal.results import ValidationReport

    model, bank, tokens = planted_circuit
    tracer = ff.FlowTracer(bank, model)
    report = tracer.validate(tokens, layers=[1], methods=("top1", "top5", "random", "permutation", "pearson", "exhaustive"), r=[0.0, 0.5],
                             positions_per_text=4, max_targets=5, loss_samples=2, progress=False)
    main = [row for row in report.rows if row.r == 0.0]
    top1 = [row for row in main if row.method == "top1"]
    assert top1 and all(row.group == "RES" for row in top1)
    for row in top1:  # the true predecessor is removed: the target is exactly zero
        index = row.target.split("/")[2]
        assert row.deactivated == [f"0/res/{index}"] and row.z_new == 0.0
    for row in (r for r in main if r.method == "random"):  # one of the top five, sometimes the wrong one
        right = row.deactivated == [f"0/res/{row.target.split('/')[2]}"]
        assert row.z_new == (0.0 if right else pytest.approx(row.z_old, abs=1e-6))
    summary = report.summary()
    with_loss = [row for row in report.rows if row.loss_change is not None]
    assert len(with_loss) == 2 * tokens.shape[0] and all(row.r == 0.0 for row in with_loss)
    row = with_loss[0]  # recompute one loss change by hand
    text = tokens[row.text:row.text + 1]
    layer_of = {"res": 0, "mlp": 1, "att": 1}
    items = [Intervention(ref.split("/")[1], layer_of[ref.split("/")[1]], (int(ref.split("/")[2]),), (row.position,), 0.0)
             for ref in row.deactivated]
    flow = ff.FlowTransformer.from_hooked(model)   # what validate runs (the fast path: rounding differs from TL's)
    with torch.no_grad():
        clean = float(flow(text, return_type="loss"))
        with intervened(flow, bank, items):
            edited = float(flow(text, return_type="loss"))
    assert row.loss_change == pytest.approx((edited - clean) / clean, rel=1e-5)
    top1_summary = {k: v for k, v in summary["top1"].items() if not k.startswith("loss")}
    assert top1_summary == {"success_rate": 1.0, "activation_change": 1.0, "n": len(top1)}
    assert summary["top5"]["success_rate"] == 1.0
    assert summary["permutation"]["success_rate"] == 1.0  # identical decoders: the identity assignment
    exhaustive = [row for row in main if row.method == "exhaustive"]
    assert [row.deactivated for row in exhaustive] == [row.deactivated for row in top1]  # found by trying each
    assert summary["exhaustive"]["success_rate"] == 1.0
    pearson = [row for row in main if row.method == "pearson"]  # res(1) = res(0): perfect correlation
    assert [row.deactivated for row in pearson] == [row.deactivated for row in top1]
    wrong = [r for r in main if r.method == "random" and r.z_new > 0]
    assert summary["random"]["success_rate"] == pytest.approx(1 - len(wrong) / summary["random"]["n"])
    # r = 0.5 halves the predecessor: with the linear identity layer the target halves too
    half = [row for row in report.rows if row.r == 0.5 and row.method == "top1"]
    assert all(row.z_new == pytest.approx(row.z_old / 2, rel=1e-5) for row in half)
    assert report.r_sweep("top1") == pytest.approx({0.0: 1.0, 0.5: 0.5})
    counts = report.group_counts["1"]["top1"]
    assert counts["RES"] == len(top1) and sum(counts.values()) == len(top1)
    again = ValidationReport.load(report.save(tmp_path / "report.json"))
    assert again.summary() == summary and again.meta == report.meta
    assert len(report.to_pandas()) == len(report.rows)
    assert leftover_hooks() == []


def test_validate_refuses_bad_input(planted_circuit):
    model, bank, tokens = planted_circuit
    tracer = ff.FlowTracer(bank, model)
    with pytest.raises(ff.FeatureFlowError, match="unknown matching methods"):
        tracer.validate(tokens, layers=[1], methods=("cosine",), progress=False)
    with pytest.raises(ff.FeatureFlowError, match="layer 0 needs"):
        tracer.validate(tokens, layers=[0], progress=False)
    with pytest.raises(ff.FeatureFlowError, match="needs a model"):
        ff.FlowTracer(bank).validate(tokens, layers=[1])


def test_bad_token_ids_and_empty_tokens_are_named_not_passed_to_torch(planted_circuit):
    model, bank, tokens = planted_circuit
    tracer = ff.FlowTracer(bank, model)
    bad = tokens.clone()
    bad[0, 3] = model.cfg.d_vocab + 5
    with pytest.raises(ff.InvalidArgumentError, match=rf"ids \[{model.cfg.d_vocab + 5}\] outside the vocabulary"):
        tracer.validate(bad, layers=[1], progress=False)
    for empty in (tokens[:0], tokens[:, :0]):
        with pytest.raises(ff.InvalidArgumentError, match=r"\[batch, pos\]"):
            tracer.validate(empty, layers=[1], progress=False)
    with pytest.raises(ValueError, match="integer tensor"):              # also a ValueError for user code
        tracer.validate(tokens.float(), layers=[1], progress=False)
    flow = ff.FlowTransformer.from_hooked(model)
    with pytest.raises(ff.InvalidArgumentError, match="-1"):
        flow.run_with_features(torch.tensor([[1, -1]]), bank=bank)
    with pytest.raises(ff.InvalidArgumentError, match="outside the vocabulary"):
        target_activations(flow, bank, bad[:1], 1, [(1, 0)], [[Intervention("mlp", 1, (0,), (1,))]])

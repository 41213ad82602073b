"""Steerer: exact arithmetic, position modes with and without the KV cache, hook hygiene, flows."""

import math

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.flow.graph import FlowEdge, FlowGraph, FlowNode
from tl_featureflow.refs import FeatureRef
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.steer.steerer import Steerer, flow_coefficients
from tl_featureflow.synthetic import D_MODEL, D_VOCAB, sae_from_decoder


def _resid(model, tokens, steerer=None):
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    if steerer is None:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    else:
        with steerer:
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return [cache[n] for n in names]


def test_add_changes_resid_post_by_exactly_s_times_v(tiny_model, tokens, bank_factory):
    bank = bank_factory()
    clean = _resid(tiny_model, tokens)
    steered = _resid(tiny_model, tokens, Steerer(tiny_model, bank, scale="unit").add("1/res/5", 3.0))
    v = bank.decoder("res", 1)[5]
    assert torch.equal(steered[0], clean[0])                      # earlier layer: bit-identical
    torch.testing.assert_close(steered[1] - clean[1], (3.0 * v).expand_as(clean[1]), rtol=0, atol=1e-6)
    assert not torch.allclose(steered[2], clean[2])               # later layers see it


def test_add_at_module_sites_and_scales(tiny_model, tokens, bank_factory):
    bank = bank_factory(arch="jumprelu")
    names = ["blocks.2.hook_mlp_out", "blocks.2.hook_attn_out"]

    def run(steerer=None):
        with steerer if steerer is not None else Steerer(tiny_model, bank, scale="unit"):
            _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in names)
        return cache

    clean = run()
    raw = bank["mlp", 2].W_dec.detach()[4]
    theta = float(bank["mlp", 2].threshold.detach()[4])
    cases = {"unit": raw / raw.norm(), "decoder": raw, "threshold": theta * raw}
    for scale, v in cases.items():
        cache = run(Steerer(tiny_model, bank, scale=scale).add("2/mlp/4", 2.0))
        torch.testing.assert_close(cache[names[0]] - clean[names[0]], (2.0 * v).expand_as(clean[names[0]]),
                                   rtol=0, atol=1e-5)
        assert torch.equal(cache[names[1]], clean[names[1]])
    cache = run(Steerer(tiny_model, bank, scale={"2/mlp/4": 0.5}).add("2/mlp/4", 2.0))
    torch.testing.assert_close(cache[names[0]] - clean[names[0]], (raw).expand_as(clean[names[0]]), rtol=0, atol=1e-5)
    with pytest.raises(ff.FeatureFlowError, match="JumpReLU"):
        Steerer(tiny_model, bank_factory(), scale="threshold").add("2/mlp/4", 1.0)
    with pytest.raises(ff.UnknownFeatureError, match="2/mlp/5"):
        Steerer(tiny_model, bank, scale={"2/mlp/4": 0.5}).add("2/mlp/5", 1.0)


def test_typical_scale_is_the_median_of_the_features_own_activations(tiny_model, tokens, bank_factory):
    """Planted stream: the scale is the median positive activation, read off the contexts' histogram."""
    from tl_featureflow.flow.contexts import HIST_EDGES, collect_top_contexts
    from tl_featureflow.steer.steerer import typical_activation

    bank = bank_factory(arch="jumprelu")
    stream = torch.randint(0, 50, (12, 12), generator=torch.Generator().manual_seed(5))
    contexts = collect_top_contexts(tiny_model, bank, stream, n=3, progress=False)
    _, feats = ff.FlowTransformer.from_hooked(tiny_model).run_with_features(stream, bank=bank)
    acts = feats["mlp", 2][:, 1:].reshape(-1, bank.d_sae("mlp", 2))
    fired = [f for f in range(acts.shape[1]) if int((acts[:, f] > 0).sum()) >= 5]
    assert fired
    for f in fired:                 # by hand: the lower median of the positive activations, same log bin
        values = acts[:, f][acts[:, f] > 0].sort().values
        median = float(values[(len(values) + 1) // 2 - 1])
        b = int(torch.bucketize(torch.tensor(median, dtype=torch.float64), HIST_EDGES, right=True)) - 1
        typical = typical_activation(contexts, f"2/mlp/{f}")
        assert HIST_EDGES[b] * (1 - 1e-9) <= typical <= HIST_EDGES[b + 1] * (1 + 1e-9)
    ref = f"2/mlp/{fired[0]}"
    names = ["blocks.2.hook_mlp_out"]
    _, clean = tiny_model.run_with_cache(tokens, names_filter=names)
    with Steerer(tiny_model, bank, scale="typical", contexts=contexts).add(ref, 2.0):
        _, steered = tiny_model.run_with_cache(tokens, names_filter=names)
    v = bank["mlp", 2].W_dec.detach()[fired[0]] * typical_activation(contexts, ref)
    torch.testing.assert_close(steered[names[0]] - clean[names[0]], (2.0 * v).expand_as(clean[names[0]]),
                               rtol=0, atol=1e-5)
    silent = [f for f in range(acts.shape[1]) if not bool((acts[:, f] > 0).any())]
    if silent:
        with pytest.raises(ff.FeatureFlowError, match="never fired"):
            with Steerer(tiny_model, bank, scale="typical", contexts=contexts).add(f"2/mlp/{silent[0]}", 1.0):
                tiny_model(tokens)


def test_rescale_one_is_identity_and_zero_removes_the_feature(tiny_model, tokens, bank_factory):
    bank = bank_factory()
    clean = _resid(tiny_model, tokens)
    same = _resid(tiny_model, tokens, Steerer(tiny_model, bank, scale="unit").rescale("1/res/7", 1.0))
    assert all(torch.equal(a, b) for a, b in zip(same, clean, strict=False))
    sae = bank["res", 1]
    acts = sae.encode(clean[1])
    removed = _resid(tiny_model, tokens, Steerer(tiny_model, bank, scale="unit").rescale("1/res/7", 0.0))
    expected = clean[1] - acts[..., 7:8] * sae.W_dec.detach()[7]
    torch.testing.assert_close(removed[1], expected, rtol=0, atol=1e-5)
    # with a tied orthonormal SAE the edited stream re-encodes with the feature at exactly zero
    basis = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(9)))[0].T
    tied = SAEBank({("res", 1): sae_from_decoder("res", 1, basis[:16])})
    acts = tied["res", 1].encode(clean[1])[..., 7]
    assert (acts > 0.1).any()
    removed = _resid(tiny_model, tokens, Steerer(tiny_model, tied, scale="unit").rescale("1/res/7", 0.0))
    after = tied["res", 1].encode(removed[1])
    torch.testing.assert_close(after[..., 7], torch.zeros_like(acts), rtol=0, atol=1e-5)
    others = [i for i in range(16) if i != 7]
    torch.testing.assert_close(after[..., others], tied["res", 1].encode(clean[1])[..., others], rtol=0, atol=1e-5)


def test_per_row_coefficients_equal_separate_runs(tiny_model, tokens, bank_factory, leftover_hooks):
    bank = bank_factory()
    both = _resid(tiny_model, tokens, Steerer(tiny_model, bank, scale="unit").add("1/res/5", [1.0, -2.0]).rescale("0/mlp/3",
                                                                                                    [0.0, 3.0]))
    for row, (s, r) in enumerate([(1.0, 0.0), (-2.0, 3.0)]):
        single = _resid(tiny_model, tokens[row:row + 1],
                        Steerer(tiny_model, bank, scale="unit").add("1/res/5", s).rescale("0/mlp/3", r))
        for a, b in zip(both, single, strict=False):
            torch.testing.assert_close(a[row:row + 1], b, rtol=0, atol=1e-5)
    with pytest.raises(ff.FeatureFlowError, match="3 rows but the batch has 2"):
        _resid(tiny_model, tokens, Steerer(tiny_model, bank, scale="unit").add("1/res/5", [1.0, 2.0, 3.0]))
    assert leftover_hooks() == []


def _generate(model, steerer, prompt, *, cache, n=8):
    with steerer:
        return model.generate(prompt, max_new_tokens=n, do_sample=False, use_past_kv_cache=cache,
                              stop_at_eos=False, verbose=False)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_kv_cache_equivalence_in_every_position_mode(tiny_model, positions, bank_factory, leftover_hooks):
    bank = bank_factory()
    prompt = torch.randint(0, D_VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    plain = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    outs = [_generate(tiny_model, Steerer(tiny_model, bank, positions=positions, scale="unit").add("1/res/5", 25.0)
                      .add("2/att/1", -10.0), prompt, cache=cache) for cache in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :5], prompt)
    assert not torch.equal(outs[0], plain)     # the steering is strong enough to matter
    assert leftover_hooks() == []


@pytest.mark.parametrize("positions", ["prompt", "generated"])
@pytest.mark.parametrize("cache", [True, False])
def test_position_modes_steer_exactly_the_right_tokens(tiny_model, positions, cache, bank_factory):
    """What each forward of a steered generate sees equals one forward of the final tokens
    with the edit applied by hand at the right absolute positions."""
    bank = bank_factory()
    prompt = torch.randint(0, D_VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    v = bank.decoder("res", 0)[2]
    seen: list[torch.Tensor] = []

    def record(h, hook):
        seen.append(h.detach().clone())

    steerer = Steerer(tiny_model, bank, positions=positions, scale="unit").add("0/res/2", 5.0)
    with tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", record)]):
        out = _generate(tiny_model, steerer, prompt, cache=cache, n=4).clone()   # generate's are inference tensors
    assert out.shape == (1, 10)

    def by_hand(h, hook):
        h = h.clone()
        where = slice(None, 6) if positions == "prompt" else slice(6, None)
        h[:, where] += 5.0 * v
        return h

    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", by_hand)]):
        _, ref = tiny_model.run_with_cache(out[:, :-1], names_filter="blocks.1.hook_resid_pre")
    expected = ref["blocks.1.hook_resid_pre"]
    got = torch.cat(seen, dim=1) if cache else seen[-1]
    assert len(seen) == 4 and [s.shape[1] for s in seen] == ([6, 1, 1, 1] if cache else [6, 7, 8, 9])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    unsteered = tiny_model.run_with_cache(out[:, :-1], names_filter="blocks.1.hook_resid_pre")[1]
    untouched = slice(6, None) if positions == "prompt" else slice(None, 6)
    # (bit-identical without the cache; the cached path's attention rounds differently)
    torch.testing.assert_close(got[:, untouched], unsteered["blocks.1.hook_resid_pre"][:, untouched], rtol=0,
                               atol=0 if not cache else 1e-5)


def test_outside_generate_positions_are_all_prompt(tiny_model, tokens, bank_factory):
    bank = bank_factory()
    clean = _resid(tiny_model, tokens)
    assert all(torch.equal(a, b) for a, b in zip(
        _resid(tiny_model, tokens, Steerer(tiny_model, bank, positions="generated", scale="unit").add("0/res/1", 9.0)), clean, strict=False))
    prompt = _resid(tiny_model, tokens, Steerer(tiny_model, bank, positions="prompt", scale="unit").add("0/res/1", 9.0))
    alls = _resid(tiny_model, tokens, Steerer(tiny_model, bank, positions="all", scale="unit").add("0/res/1", 9.0))
    assert all(torch.equal(a, b) for a, b in zip(prompt, alls, strict=False))


def test_no_hook_remains_after_exception_nesting_or_interrupt(tiny_model, tokens, bank_factory, leftover_hooks):
    bank = bank_factory()
    user_calls = []

    def user_hook(h, hook):
        user_calls.append(hook.name)

    steerer = Steerer(tiny_model, bank, positions="generated", scale="unit").add("1/res/5", 2.0)
    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", user_hook)]):
        with pytest.raises(RuntimeError, match="boom"):
            with steerer:
                tiny_model(tokens)
                raise RuntimeError("boom")
        assert "generate" not in vars(tiny_model)
        with pytest.raises(KeyboardInterrupt):
            with steerer:
                raise KeyboardInterrupt
        tiny_model(tokens)                       # the user's hook survives our exits
        assert len(user_calls) == 2
        assert len(tiny_model.blocks[0].hook_resid_post.fwd_hooks) == 1
    assert leftover_hooks() == []
    assert "generate" not in vars(tiny_model)
    with steerer, pytest.raises(ff.FeatureFlowError, match="already active"):
        steerer.__enter__()
    assert leftover_hooks() == []


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_nested_steerers_exit_in_any_order(tiny_model, tokens, positions, bank_factory, leftover_hooks):
    """Issue 24 #3: entered a then b, exited a first; the model then runs b's edit alone (it ran a's)."""
    bank = bank_factory()
    a = Steerer(tiny_model, bank, positions=positions, scale="unit").add("1/res/5", 3.0)
    b = Steerer(tiny_model, bank, positions="prompt", scale="unit").add("2/res/1", -4.0)
    prompt = tokens[:1, :5]
    with Steerer(tiny_model, bank, positions="prompt", scale="unit").add("2/res/1", -4.0):
        alone, alone_gen = tiny_model(tokens), _generate_plain(tiny_model, prompt)
    clean = tiny_model(tokens)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert torch.equal(tiny_model(tokens), alone) and "generate" in vars(tiny_model)   # b still counts positions
    assert torch.equal(_generate_plain(tiny_model, prompt), alone_gen)
    b.__exit__(None, None, None)
    assert torch.equal(tiny_model(tokens), clean)
    assert leftover_hooks() == [] and "generate" not in vars(tiny_model)


def _generate_plain(model, prompt):
    return model.generate(prompt, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False).clone()


def test_a_steerer_refuses_forwards_and_steerers_from_other_threads(tiny_model, tokens, bank_factory, leftover_hooks):
    """Issue 24 #4: one model's hooks are shared by every thread; a second thread is refused, not mixed in."""
    import threading

    bank = bank_factory()
    errors: list[BaseException] = []

    def in_thread(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - the test reads it
                errors.append(e)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

    with Steerer(tiny_model, bank, scale="unit").add("1/res/5", 3.0) as steerer:
        in_thread(lambda: tiny_model(tokens))
        in_thread(lambda: Steerer(tiny_model, bank, scale="unit").add("2/res/1", 1.0).__enter__())
        tiny_model(tokens)                                        # its own thread is fine
    assert [type(e) for e in errors] == [ff.errors.StateError] * 2
    assert "another thread" in str(errors[0]) and "another thread" in str(errors[1]) and not steerer.active
    assert leftover_hooks() == []
    in_thread(lambda: tiny_model(tokens))                         # nothing active: any thread may run the model
    assert len(errors) == 2


def test_hooks_for_run_with_hooks_and_attached_flow_transformer(tiny_model, tokens, bank_factory):
    bank = bank_factory()
    steerer = Steerer(tiny_model, bank, scale="unit").add("2/res/3", 4.0)
    with steerer:
        expected = tiny_model(tokens)
    got = tiny_model.run_with_hooks(tokens, fwd_hooks=steerer.hooks())
    assert torch.equal(got, expected)
    flow = ff.FlowTransformer.from_hooked(tiny_model)
    with flow.attached(bank):
        with Steerer(flow, bank, scale="unit").add("2/res/3", 4.0):
            spliced = flow(tokens)
    torch.testing.assert_close(spliced, expected, rtol=0, atol=1e-5)


def test_bad_input_is_named(tiny_model, bank_factory):
    bank = bank_factory()
    with pytest.raises(ff.UnknownFeatureError, match="1/res/99"):
        Steerer(tiny_model, bank, scale="unit").add("1/res/99", 1.0)
    with pytest.raises(ff.FeatureFlowError, match="positions 'later'"):
        Steerer(tiny_model, bank, positions="later", scale="unit")
    with pytest.raises(ff.FeatureFlowError, match="needs the SAE bank"):
        Steerer(tiny_model, scale="unit").add("1/res/1", 1.0)
    with pytest.raises(ff.FeatureFlowError, match="NaN"):
        Steerer(tiny_model, bank, scale="unit").add("1/res/1", float("nan"))
    with pytest.raises(ff.FeatureFlowError, match=r"expected \(32,\)"):
        Steerer(tiny_model, scale="unit").add_direction("res", 1, torch.ones(5), 1.0)
    with pytest.raises(ff.FeatureFlowError, match="d_model=32"):
        Steerer(tiny_model, bank_factory(d_in=16), scale="unit")
    with pytest.raises(ff.FeatureFlowError, match="HookedTransformer"):
        Steerer(object(), bank, scale="unit")


def test_add_direction_without_a_bank(tiny_model, tokens):
    direction = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(2))
    clean = _resid(tiny_model, tokens)
    steered = _resid(tiny_model, tokens, Steerer(tiny_model, scale="unit").add_direction("res", 0, direction, 0.5))
    torch.testing.assert_close(steered[0] - clean[0], (0.5 * direction).expand_as(clean[0]), rtol=0, atol=1e-6)


def _graph():
    refs = [FeatureRef(0, "res", 1), FeatureRef(1, "res", 2), FeatureRef(1, "mlp", 4), FeatureRef(2, "res", 3)]
    nodes = [FlowNode(refs[0], "chain"), FlowNode(refs[1], "seed"), FlowNode(refs[2], "module"),
             FlowNode(refs[3], "chain")]
    edges = [FlowEdge(refs[0], refs[1], 0.8), FlowEdge(refs[2], refs[1], 0.3), FlowEdge(refs[1], refs[3], 0.7)]
    return FlowGraph(refs[1], nodes, edges, (0, 2), 0.5, 0.15, "both")


def test_flow_coefficients_modes_and_schedules():
    graph = _graph()
    single = flow_coefficients(graph, 4.0)
    assert [(str(r), c) for r, c in single] == [("1/mlp/4", 4.0), ("1/res/2", 4.0)]   # forward order

    cum = dict(flow_coefficients(graph, 4.0, mode="cumulative", up_to_layer=1))
    assert sorted(map(str, cum)) == ["0/res/1", "1/mlp/4", "1/res/2"]
    expo = dict(flow_coefficients(graph, 4.0, mode="cumulative", schedule="exponential", alpha=-0.5))
    assert expo[FeatureRef(2, "res", 3)] == pytest.approx(4.0 * math.exp(-1.0))
    lin = dict(flow_coefficients(graph, 4.0, mode="cumulative", schedule="linear"))
    assert [lin[FeatureRef(layer, "res", i)] for layer, i in ((0, 1), (1, 2), (2, 3))] == pytest.approx([4.0, 2.5, 1.0])
    rows = dict(flow_coefficients(graph, torch.tensor([2.0, 4.0]), mode="cumulative", schedule="linear"))
    torch.testing.assert_close(rows[FeatureRef(1, "res", 2)], torch.tensor([1.5, 2.5]))
    with pytest.raises(ff.UnknownFeatureError, match="no feature at layer 5"):
        flow_coefficients(graph, 1.0, up_to_layer=5)
    with pytest.raises(ff.FeatureFlowError, match="unknown schedule"):
        flow_coefficients(graph, 1.0, schedule="cosine")


def test_along_equals_the_same_edits_by_hand(tiny_model, tokens, bank_factory):
    bank = bank_factory()
    graph = _graph()
    by_graph = _resid(tiny_model, tokens, Steerer(tiny_model, bank, scale="unit").along(graph, 2.0, mode="cumulative"))
    by_hand = _resid(tiny_model, tokens, Steerer(tiny_model, bank, scale="unit").add("0/res/1", 2.0).add("1/res/2", 2.0)
                     .add("1/mlp/4", 2.0).add("2/res/3", 2.0))
    assert all(torch.equal(a, b) for a, b in zip(by_graph, by_hand, strict=False))
    suppressed = _resid(tiny_model, tokens, Steerer(tiny_model, bank, scale="unit").along(graph, 0.0, op="rescale"))
    manual = _resid(tiny_model, tokens, Steerer(tiny_model, bank, scale="unit").rescale("1/res/2", 0.0).rescale("1/mlp/4", 0.0))
    assert all(torch.equal(a, b) for a, b in zip(suppressed, manual, strict=False))


def test_steering_a_bfloat16_model(tokens, bank_factory):
    from transformer_lens import HookedTransformer

    from tl_featureflow.synthetic import tiny_cfg

    torch.manual_seed(0)
    model = HookedTransformer(tiny_cfg(dtype=torch.bfloat16)).eval()
    bank = bank_factory().to(dtype=torch.bfloat16)
    clean = _resid(model, tokens)
    steered = _resid(model, tokens, Steerer(model, bank, scale="unit").add("1/res/5", 3.0).rescale("2/mlp/1", 0.0))
    assert steered[1].dtype == torch.bfloat16 and torch.equal(steered[0], clean[0])
    v = bank.decoder("res", 1, dtype=torch.float32)[5]
    torch.testing.assert_close((steered[1].float() - clean[1].float()), (3.0 * v).expand_as(clean[1]).float(),
                               rtol=0, atol=0.1)


def test_one_steering_scale_default_across_python_cli_and_cards(tiny_model, bank_factory):
    import inspect

    from tl_featureflow import cli
    from tl_featureflow.steer.report_card import CardSettings
    from tl_featureflow.steer.sweeps import SweepSettings

    defaults = {inspect.signature(Steerer).parameters["scale"].default, SweepSettings().scale, CardSettings().scale,
                cli.build_parser().parse_args(["steer", "1/res/3"]).scale}
    assert defaults == {"typical"}
    assert SweepSettings.from_dict({"strengths": [1.0]}).scale == "unit"      # sweeps saved before the field
    with pytest.raises(ff.InvalidArgumentError, match="no tokenizer: pass contexts="):
        Steerer(tiny_model, bank_factory()).add("2/res/1", 4.0)   # the tiny model has no tokenizer

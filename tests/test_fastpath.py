"""The fast path computes what TransformerLens computes: logits, hooks, greedy tokens, edits, steering."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformer_lens import HookedTransformer

import tl_featureflow as ff
from tl_featureflow import fastpath
from tl_featureflow.synthetic import planted_chain_bank, tiny_cfg

# every architecture the tests build: LayerNorm + GELU MLP (the tiny_cfg model), Llama-like gated
# MLP with RMS norms and grouped-query attention (SmolLM2's layout), and gated with plain attention.
CONFIGS = {
    "ln_gelu": tiny_cfg(),
    "llama_gqa": tiny_cfg(gated_mlp=True, act_fn="silu", normalization_type="RMS", n_key_value_heads=2),
    "gated_mha": tiny_cfg(gated_mlp=True, act_fn="silu", normalization_type="RMS"),
}
TOKENS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))


def _pair(name: str) -> tuple[HookedTransformer, ff.FlowTransformer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.manual_seed(0)
        plain = HookedTransformer(CONFIGS[name]).eval()
    return plain, ff.FlowTransformer.from_hooked(plain)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_every_hook_match_transformer_lens(name):
    plain, fast = _pair(name)
    assert fast.fast_path.enabled and fast.fast_path.attentions == 3
    assert fast.fast_path.mlps == (3 if CONFIGS[name].gated_mlp else 0) and fast.fast_path.unembed
    with torch.no_grad():
        logits, cache = fast.run_with_cache(TOKENS)
        ref_logits, ref_cache = plain.run_with_cache(TOKENS)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert set(cache.keys()) - {k for k in cache.keys() if k.endswith("mlp.hook_in")} == set(ref_cache.keys())
    for key, ref in ref_cache.items():
        assert cache[key].shape == ref.shape, key
        torch.testing.assert_close(cache[key], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kv_cache", [True, False])
def test_greedy_generation_is_identical(name, kv_cache):
    plain, fast = _pair(name)
    prompt = TOKENS[:1, :4]
    kwargs = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False, use_past_kv_cache=kv_cache)
    assert torch.equal(fast.generate(prompt, **kwargs), plain.generate(prompt, **kwargs))


def test_turning_it_off_is_transformer_lens_bit_for_bit():
    plain, fast = _pair("llama_gqa")
    fast.use_fast_path(False)
    assert not fast.fast_path.enabled
    with torch.no_grad():
        assert torch.equal(fast(TOKENS), plain(TOKENS))
    fast.use_fast_path(True)
    with torch.no_grad():
        torch.testing.assert_close(fast(TOKENS), plain(TOKENS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight", ["blocks.1.mlp.W_gate", "blocks.1.mlp.W_in", "blocks.0.attn.W_Q",
                                    "blocks.2.attn._W_K", "unembed.W_U"])
def test_weight_edits_after_loading_are_seen(weight):
    plain, fast = _pair("llama_gqa")
    with torch.no_grad():
        before = fast(TOKENS)
        dict(plain.named_parameters())[weight].mul_(1.5)         # shared with the wrapper: nothing is cached
        after, ref = fast(TOKENS), plain(TOKENS)
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=0)


def test_a_deep_copy_runs_its_own_weights():
    _, fast = _pair("llama_gqa")
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        before = fast(TOKENS)
        twin.blocks[0].mlp.W_out.mul_(3.0)
        assert torch.equal(fast(TOKENS), before)
        assert not torch.allclose(twin(TOKENS), before, atol=1e-4)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steering_is_exact_under_the_fast_path(positions):
    """Steered greedy tokens: identical with and without the KV cache, and equal to TransformerLens's path."""
    torch.manual_seed(0)
    fast = ff.FlowTransformer(tiny_cfg(d_model=64, n_heads=4, d_head=16, gated_mlp=True, act_fn="silu",
                                       normalization_type="RMS", n_key_value_heads=2, n_layers=4)).eval()
    slow = ff.FlowTransformer.from_hooked(fast, fast_path=False)
    bank, _ = planted_chain_bank()
    graph = ff.FlowTracer(bank).trace("2/res/1")
    prompt = TOKENS[:1, :4]
    outs = []
    for model in (fast, slow):
        for kv in (True, False):
            with ff.Steerer(model, bank, positions=positions, scale="unit").along(graph, 30.0, mode="cumulative"):
                outs.append(model.generate(prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False,
                                           verbose=False, use_past_kv_cache=kv))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    plain = fast.generate(prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    assert positions == "prompt" or not torch.equal(outs[0], plain)


def test_unsupported_components_fall_back_and_say_so_once():
    cfg = tiny_cfg(gated_mlp=True, act_fn="silu", normalization_type="RMS", use_split_qkv_input=True)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="keep TransformerLens's slower path: blocks.0.attn \\(split Q/K/V"):
        model = ff.FlowTransformer(cfg).eval()
    assert model.fast_path.attentions == 0 and model.fast_path.mlps == 3 and len(model.fast_path.fallback) == 3
    reference = ff.FlowTransformer.from_hooked(model, fast_path=False)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS), atol=1e-5, rtol=0)


def test_disable_restores_every_forward():
    _, fast = _pair("llama_gqa")
    fastpath.disable(fast)
    assert "calculate_qkv_matrices" not in vars(fast.blocks[0].attn) and "forward" not in vars(fast.unembed)
    assert repr(fastpath.disable(fast)) == "FastPath(off)"


# -- "exact": the copies made once, TransformerLens bit for bit ----------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_exact_mode_is_transformer_lens_bit_for_bit(name):
    plain, fast = _pair(name)
    fast.use_fast_path("exact")
    assert fast.fast_path.mode == "exact" and fast.fast_path.attentions == 3
    with torch.no_grad():
        logits, cache = fast.run_with_cache(TOKENS)
        ref_logits, ref_cache = plain.run_with_cache(TOKENS)
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(cache[key], ref) for key, ref in ref_cache.items())
    prompt = TOKENS[:1, :4]
    kwargs = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(fast.generate(prompt, **kwargs), plain.generate(prompt, **kwargs))


@pytest.mark.parametrize("edit", ["in_place", "through_data", "reassign_data", "new_parameter"])
def test_exact_mode_sees_every_kind_of_weight_edit(edit):
    plain, fast = _pair("llama_gqa")
    fast.use_fast_path("exact")
    with torch.no_grad():
        fast(TOKENS)                                            # the copies are made
        mlp, plain_mlp = fast.blocks[1].mlp, plain.blocks[1].mlp
        if edit == "in_place":
            plain_mlp.W_in.mul_(2.0)
        elif edit == "through_data":                            # issue 24 #1: no version-counter bump
            plain_mlp.W_in.data.mul_(2.0)
            plain.blocks[0].attn.W_Q.data[0] *= -1.0
            plain.blocks[2].attn.W_O.data[1] *= 3.0
            plain.unembed.W_U.data.mul_(0.5)
        elif edit == "reassign_data":
            plain_mlp.W_in.data = plain_mlp.W_in.data * 2.0     # new storage, same Parameter object
        else:
            new = torch.nn.Parameter(plain_mlp.W_in.detach() * 2.0)
            plain_mlp.W_in, mlp.W_in = new, new
        assert torch.equal(fast(TOKENS), plain(TOKENS))


def test_exact_mode_keeps_gradients_to_the_weights():
    plain, fast = _pair("llama_gqa")
    fast.use_fast_path("exact")
    fast(TOKENS).sum().backward()
    grad = fast.blocks[0].mlp.W_gate.grad.clone()             # shared parameter with `plain`
    fast.zero_grad()
    plain(TOKENS).sum().backward()
    torch.testing.assert_close(grad, plain.blocks[0].mlp.W_gate.grad, atol=1e-6, rtol=1e-5)
    assert grad.abs().sum() > 0


def test_exact_mode_keeps_no_copies_only_another_memory_order():
    """"exact" re-strides the parameters once (values, shapes and objects kept) so TL's per-step copy is a
    view of the live storage: nothing cached that an edit could leave stale (issue 24 #1)."""
    plain, fast = _pair("llama_gqa")
    mlp, attn, unembed = fast.blocks[0].mlp, fast.blocks[0].attn, fast.unembed
    before = {name: (param, param.detach().clone()) for name, param in fast.named_parameters()}
    untouched = copy.deepcopy(plain)
    fast.use_fast_path("exact")
    assert mlp.W_in.T.is_contiguous() and unembed.W_U.T.is_contiguous()
    assert attn.W_Q.permute(0, 2, 1).is_contiguous() and attn.W_O.permute(2, 0, 1).is_contiguous()
    for name, param in fast.named_parameters():
        assert param is before[name][0] and torch.equal(param, before[name][1]), name
    with torch.no_grad():
        fast(TOKENS)
    assert not any(key.startswith("_featureflow") for module in fast.modules() for key in vars(module))
    with torch.no_grad():                     # the user's model shares the parameters: its own forward unchanged
        assert plain.blocks[0].mlp.W_in is mlp.W_in and torch.equal(plain(TOKENS), untouched(TOKENS))
    fast.use_fast_path(False)
    assert "forward" not in vars(unembed)
    with pytest.raises(ff.InvalidArgumentError, match="fast path mode"):
        fast.use_fast_path("quick")


def test_a_twin_on_another_path_shares_the_weights():
    _, fast = _pair("llama_gqa")
    assert ff.FlowTransformer.from_hooked(fast) is fast                   # no path asked: as is
    twin = ff.FlowTransformer.from_hooked(fast, fast_path=False)          # asked: a new model, same tensors
    assert twin is not fast and not twin.fast_path.enabled and fast.fast_path.enabled
    assert twin.blocks[0].mlp.W_in is fast.blocks[0].mlp.W_in
    assert "forward" not in vars(twin.unembed) and "forward" in vars(fast.unembed)


@pytest.mark.parametrize("mode", ["views", "exact"])
@pytest.mark.parametrize("flag", ["use_split_qkv_input", "use_attn_in"])
def test_config_flags_set_after_construction_route_to_transformer_lens(mode, flag):
    """Issue 24 #2: TL's test_split_qkv.py sets the flag on a built model; "views" then raised an einsum error and
    "exact" a reshape error. (Multi-head attention: TransformerLens's own use_attn_in path does not take GQA.)"""
    plain, fast = _pair("gated_mha")
    fast.use_fast_path(mode)
    setattr(fast.cfg, flag, True)                    # one cfg object: the plain model sees it too
    with torch.no_grad():
        torch.testing.assert_close(fast(TOKENS), plain(TOKENS), atol=1e-5, rtol=0)
    setattr(fast.cfg, flag, False)
    with torch.no_grad():
        torch.testing.assert_close(fast(TOKENS), plain(TOKENS), atol=1e-5, rtol=0)

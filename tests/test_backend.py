"""The model seam (tl_featureflow/backend.py): the TransformerLens backend equals direct TL calls, and a second
backend is one new class that the causal primitives run through."""

from __future__ import annotations

import pytest
import torch

from tl_featureflow.backend import ModelBackend, TLBackend, backend_of
from tl_featureflow.causal.interventions import Intervention, res_activations
from tl_featureflow.refs import SITES, hook_name, resid_pre_hook


@pytest.fixture
def toks() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))


def test_tl_backend_passes_the_model_through(tiny_model):
    backend = backend_of(tiny_model)
    assert isinstance(backend, TLBackend) and isinstance(backend, ModelBackend)
    assert backend.model is tiny_model and backend_of(backend) is backend
    assert not isinstance(tiny_model, ModelBackend)
    cfg = tiny_model.cfg
    assert (backend.n_layers, backend.d_model, backend.d_vocab, backend.n_ctx) == (
        cfg.n_layers, cfg.d_model, cfg.d_vocab, cfg.n_ctx)
    assert backend.tokenizer is tiny_model.tokenizer
    for site in SITES:
        for layer in range(cfg.n_layers):
            assert backend.hook_point(site, layer) == hook_name(site, layer)
            assert backend.has_hook(backend.hook_point(site, layer))
    assert not backend.has_hook("blocks.0.no_such_hook")


@pytest.mark.parametrize("sandwich", [False, True])
def test_attention_out_is_the_models_own_w_o_b_o_and_post_norm(sandwich):
    """``attention_out(L)`` hands over the block's own tensors (no copies); a post-attention norm's weight only
    where the block has one (Gemma 2/3's ``ln1_post``): the ``hook_z`` -> ``hook_attn_out`` map of z-SAEs."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, n_ctx=8, d_vocab=20,
                                  act_fn="gelu", normalization_type="RMS",
                                  use_normalization_before_and_after=sandwich, seed=0)
    model = HookedTransformer(cfg)
    W_O, b_O, weight = backend_of(model).attention_out(1)
    assert W_O is model.blocks[1].attn.W_O and b_O is model.blocks[1].attn.b_O
    assert W_O.shape == (4, 4, 16)
    assert (weight is model.blocks[1].ln1_post.w) if sandwich else weight is None


def test_the_sae_side_streams_activations_through_the_backend(tiny_model, monkeypatch):
    """ActivationStream (SAE training, thresholds) runs its forwards through ``backend_of(model)``."""
    from tl_featureflow.saes import stream as stream_module
    from tl_featureflow.saes.stream import ActivationStream

    recording = RecordingBackend(backend_of(tiny_model))
    monkeypatch.setattr(stream_module, "backend_of", lambda model: recording)
    rows = torch.randint(0, 64, (16, 9), generator=torch.Generator().manual_seed(2))
    hooks = [hook_name("res", 1), hook_name("mlp", 1)]
    batch = ActivationStream(tiny_model, rows, hooks, batch_tokens=32, chunk_rows=8, last_block=1).batch(0)
    assert recording.calls == ["run_with_cache"] and set(batch) == set(hooks)
    _, cache = tiny_model.run_with_cache(rows, names_filter=hooks, stop_at_layer=2)
    every = cache[hooks[0]][:, 1:].flatten(0, 1)                   # the stream's rows are the model's, shuffled
    assert batch[hooks[0]].shape == (32, tiny_model.cfg.d_model)
    assert (batch[hooks[0]][:, None] - every[None]).abs().amax(-1).min(1).values.max() < 1e-6


@torch.no_grad()
def test_tl_backend_runs_equal_direct_tl_calls(tiny_model, toks):
    backend = backend_of(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    name = hook_name("mlp", 1)

    def double(x, hook):
        return 2 * x

    assert torch.equal(backend.run_with_hooks(toks, [(name, double)]),
                       tiny_model.run_with_hooks(toks, fwd_hooks=[(name, double)]))
    assert torch.equal(backend.run_with_hooks(toks, [], stop_at_layer=2), tiny_model(toks, stop_at_layer=2))
    names = [hook_name("res", 0), resid_pre_hook(2)]
    cache = backend.run_with_cache(toks, names, stop_at_layer=3)
    _, direct = tiny_model.run_with_cache(toks, names_filter=names, stop_at_layer=3)
    for n in names:
        assert torch.equal(cache[n], direct[n])
    entering = backend.resid_entering(toks, 2)
    assert torch.equal(entering, direct[resid_pre_hook(2)])
    assert torch.equal(backend.run_from_layer(entering, 2), tiny_model(entering, start_at_layer=2))
    assert torch.equal(backend.run_from_layer(entering, 2), tiny_model(toks))
    direction = torch.randn(5, backend.d_model, generator=torch.Generator().manual_seed(0))
    assert torch.equal(backend.unembed(direction), (direction * tiny_model.ln_final.w) @ tiny_model.W_U)
    for k, v in tiny_model.state_dict().items():          # never modifies the model
        assert torch.equal(v, before[k])


def test_tl_backend_removes_hooks_even_on_errors(tiny_model, toks, leftover_hooks):
    backend = backend_of(tiny_model)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        backend.run_with_hooks(toks, [(hook_name("att", 0), boom)])
    with pytest.raises(RuntimeError, match="boom"), backend.hooks([(hook_name("att", 0), boom)]):
        tiny_model(toks)
    assert leftover_hooks() == []
    assert torch.equal(backend.run_with_hooks(toks, []), tiny_model(toks))


def test_tl_backend_tokenizes_and_generates_as_the_model(text_model_factory):
    model = text_model_factory()
    backend = backend_of(model)
    assert torch.equal(backend.tokenize("hello"), model.to_tokens("hello"))
    prompt = backend.tokenize("ab")
    kwargs = dict(max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(backend.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


class RecordingBackend:
    """A second backend: every call goes to ``inner`` and is recorded. A new backend is one class like this."""

    def __init__(self, inner: ModelBackend):
        self.inner, self.model, self.calls = inner, inner.model, []
        self.n_layers, self.d_model, self.d_vocab = inner.n_layers, inner.d_model, inner.d_vocab
        self.n_ctx, self.tokenizer = inner.n_ctx, inner.tokenizer

    def _call(self, name, *args, **kwargs):
        self.calls.append(name)
        return getattr(self.inner, name)(*args, **kwargs)

    def hook_point(self, site, layer):
        return self._call("hook_point", site, layer)

    def has_hook(self, name):
        return self._call("has_hook", name)

    def hooks(self, fwd_hooks):
        return self._call("hooks", fwd_hooks)

    def run_with_hooks(self, tokens, fwd_hooks, *, stop_at_layer=None):
        return self._call("run_with_hooks", tokens, fwd_hooks, stop_at_layer=stop_at_layer)

    def run_with_cache(self, tokens, names, *, stop_at_layer=None):
        return self._call("run_with_cache", tokens, names, stop_at_layer=stop_at_layer)

    def resid_entering(self, tokens, layer):
        return self._call("resid_entering", tokens, layer)

    def run_from_layer(self, resid, start, stop=None):
        return self._call("run_from_layer", resid, start, stop)

    def tokenize(self, text, **kwargs):
        return self._call("tokenize", text, **kwargs)

    def generate(self, *args, **kwargs):
        return self._call("generate", *args, **kwargs)

    def unembed(self, direction):
        return self._call("unembed", direction)

    def attention_out(self, layer):
        return self._call("attention_out", layer)

    def weight_processing(self):
        return self._call("weight_processing")


@torch.no_grad()
@pytest.mark.parametrize("layer_local", [True, False])
def test_a_causal_primitive_runs_through_a_second_backend(tiny_model, bank_factory, layer_local):
    bank = bank_factory()
    tokens = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(7))
    plans = [[Intervention("res", 1, (4, 9), (3,), 0.0)],
             [Intervention("mlp", 2, (1,), (5,), 2.5), Intervention("att", 2, (2, 3), (5, 4), -1.0)]]
    recording = RecordingBackend(backend_of(tiny_model))
    assert isinstance(recording, ModelBackend) and backend_of(recording) is recording
    through = res_activations(recording, bank, tokens, 2, [3, 5], plans, layer_local=layer_local)
    direct = res_activations(tiny_model, bank, tokens, 2, [3, 5], plans, layer_local=layer_local)
    assert torch.equal(through, direct)
    expected = {"resid_entering", "hooks", "run_from_layer"} if layer_local else {"hooks", "run_with_cache"}
    assert set(recording.calls) == expected

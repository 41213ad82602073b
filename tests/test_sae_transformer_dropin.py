"""FlowTransformer is a drop-in HookedSAETransformer.

The behaviours SAELens's own HookedSAETransformer tests check (its
``tests/analysis/test_hooked_sae_transformer.py``: adding, overwriting and resetting
SAEs, the ``saes`` context and its restores, ``run_with_saes`` / ``run_with_cache`` /
``run_with_hooks`` and their ``_with_saes`` forms, the error term, transcoders, hook_z
SAEs, ``mlp.hook_in``, gradients), rewritten for tiny offline models and run on four
models: SAELens's class itself (the reference: it shows each test is right), a
``FlowTransformer``, ``FlowTransformer.from_hooked(...)``, and a FlowTransformer with
an SAE bank attached at other hooks (layers 1-2), which must stay attached and bit-exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer, StandardSAE, StandardSAEConfig, Transcoder, TranscoderConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint

from tl_featureflow import FlowTransformer, _compat
from tl_featureflow.synthetic import D_VOCAB, make_bank, tiny_cfg

USER_HOOKS = ("blocks.0.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.0.mlp.hook_post", "blocks.0.hook_resid_pre")
KINDS = ("HookedSAETransformer", "FlowTransformer", "from_hooked", "bank_attached")
TOKENS = torch.randint(0, D_VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def inc(self, *args: object, **kwargs: object) -> None:
        self.count += 1


def _fresh(kind: str) -> HookedSAETransformer:
    torch.manual_seed(0)
    if kind == "HookedSAETransformer":
        return HookedSAETransformer(tiny_cfg()).eval()
    if kind == "from_hooked":
        return FlowTransformer.from_hooked(HookedTransformer(tiny_cfg()).eval())
    model = FlowTransformer(tiny_cfg()).eval()
    if kind == "bank_attached":
        model.attach(make_bank(layers=[1, 2]))
    return model


@pytest.fixture(params=KINDS)
def model(request: pytest.FixtureRequest) -> Iterator[HookedSAETransformer]:
    model = _fresh(request.param)
    bank_wrappers = dict(_compat.sae_wrappers(model))
    yield model
    if isinstance(model, FlowTransformer) and model.bank is not None:
        # the bank is still attached exactly as it was: its own wrappers, outputs bit-identical to the plain model
        model.reset_saes([name for name in model.acts_to_saes if name not in bank_wrappers])
        assert all(_compat.sae_wrappers(model)[name] is w for name, w in bank_wrappers.items())
        assert torch.equal(model(TOKENS), _fresh("FlowTransformer")(TOKENS))


@pytest.fixture
def original_logits(model: HookedSAETransformer) -> torch.Tensor:
    return model(TOKENS)


def user_saes(model: HookedSAETransformer) -> dict[str, SAE]:
    """The SAEs attached by the test (a bank's are not counted)."""
    bank = model.bank if isinstance(model, FlowTransformer) else None
    names = set() if bank is None else {f"blocks.{layer}.{h}" for site, layer in bank
                                        for h in [{"res": "hook_resid_post", "mlp": "hook_mlp_out",
                                                   "att": "hook_attn_out"}[site]]}
    return {name: sae for name, sae in model.acts_to_saes.items() if name not in names}


def wrapper_at(model: HookedSAETransformer, name: str) -> object:
    obj: object = model
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)  # type: ignore[index]
    return obj


def sae_at(model: HookedSAETransformer, name: str, seed: int = 0) -> SAE:
    cfg = model.cfg
    d_in = {"hook_z": cfg.d_head * cfg.n_heads, "hook_mlp_out": cfg.d_model, "hook_resid_pre": cfg.d_model,
            "hook_post": cfg.d_mlp}[name.split(".")[-1]]
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in, reshape_activations="hook_z" if name.endswith(
        "hook_z") else "none", metadata=SAEMetadata(hook_name=name)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return sae


@pytest.fixture(params=USER_HOOKS)
def one_sae(model: HookedSAETransformer, request: pytest.FixtureRequest) -> SAE:
    return sae_at(model, request.param)


@pytest.fixture
def all_saes(model: HookedSAETransformer) -> list[SAE]:
    return [sae_at(model, name, seed=i) for i, name in enumerate(USER_HOOKS)]


def transcoder(model: HookedSAETransformer) -> Transcoder:
    d = model.cfg.d_model
    sae = Transcoder(TranscoderConfig(d_in=d, d_sae=2 * d, d_out=d, apply_b_dec_to_input=False,
                                      metadata=SAEMetadata(hook_name="blocks.0.mlp.hook_in",
                                                           hook_name_out="blocks.0.hook_mlp_out")))
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return sae


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def assert_not_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert not torch.allclose(a, b, atol=atol, rtol=0)


# -- attaching and resetting ---------------------------------------------------------------------
def test_no_saes_matches_the_original(model, original_logits):
    assert user_saes(model) == {}
    assert_close(model(TOKENS), original_logits)


def test_saes_change_the_output(model, one_sae, original_logits):
    model.add_sae(one_sae)
    assert len(user_saes(model)) == 1
    assert_not_close(model(TOKENS), original_logits)


def test_add_sae_splices_a_wrapper(model, one_sae):
    name = one_sae.cfg.metadata.hook_name
    model.add_sae(one_sae)
    assert user_saes(model) == {name: one_sae}
    wrapper = wrapper_at(model, name)
    assert isinstance(wrapper, _compat.SAEWrapper) and wrapper.sae is one_sae


def test_add_sae_overwrites_the_previous_one(model, one_sae):
    name = one_sae.cfg.metadata.hook_name
    model.add_sae(one_sae)
    second = sae_at(model, name, seed=5)
    model.add_sae(second)
    assert user_saes(model) == {name: second} and wrapper_at(model, name).sae is second


def test_reset_saes_removes_every_sae(model, all_saes):
    for sae in all_saes:
        model.add_sae(sae)
    assert user_saes(model) == {sae.cfg.metadata.hook_name: sae for sae in all_saes}
    model.reset_saes()
    assert model.acts_to_saes == {}
    assert all(isinstance(wrapper_at(model, name), HookPoint) for name in USER_HOOKS)
    if isinstance(model, FlowTransformer):
        assert model.bank is None                # a bank goes too: all or nothing


def test_reset_saes_of_named_hooks_only(model, all_saes):
    for sae in all_saes:
        model.add_sae(sae)
    model.reset_saes(USER_HOOKS[0])
    assert USER_HOOKS[0] not in model.acts_to_saes and isinstance(wrapper_at(model, USER_HOOKS[0]), HookPoint)
    assert set(user_saes(model)) == set(USER_HOOKS[1:])


# -- the saes context and run_with_* -------------------------------------------------------------
def test_saes_context_removes_its_saes(model, all_saes):
    with model.saes(saes=all_saes):
        for sae in all_saes:
            assert wrapper_at(model, sae.cfg.metadata.hook_name).sae is sae
        model(TOKENS)
    assert user_saes(model) == {}
    assert all(isinstance(wrapper_at(model, name), HookPoint) for name in USER_HOOKS)


def test_saes_context_restores_the_previous_saes(model, all_saes):
    for sae in all_saes:
        model.add_sae(sae)
    temporary = [sae_at(model, name, seed=20 + i) for i, name in enumerate(USER_HOOKS)]
    with model.saes(saes=temporary):
        assert all(wrapper_at(model, s.cfg.metadata.hook_name).sae is s for s in temporary)
        model(TOKENS)
    assert all(wrapper_at(model, s.cfg.metadata.hook_name).sae is s for s in all_saes)
    assert len(user_saes(model)) == len(all_saes)


def test_saes_context_with_run_with_cache(model, all_saes):
    with model.saes(saes=all_saes):
        _, cache = model.run_with_cache(TOKENS)
        assert all(f"{name}.hook_sae_acts_post" in cache for name in USER_HOOKS)
    assert user_saes(model) == {}


def test_run_with_saes(model, all_saes, original_logits):
    assert_not_close(model.run_with_saes(TOKENS, saes=all_saes), original_logits)
    assert user_saes(model) == {}


def test_run_with_cache_with_attached_saes(model, all_saes, original_logits):
    for sae in all_saes:
        model.add_sae(sae)
    logits, cache = model.run_with_cache(TOKENS)
    assert_not_close(logits, original_logits)
    assert isinstance(cache, ActivationCache)
    assert all(f"{name}.hook_sae_acts_post" in cache for name in USER_HOOKS)


def test_run_with_cache_with_saes(model, all_saes, original_logits):
    logits, cache = model.run_with_cache_with_saes(TOKENS, saes=all_saes)
    assert_not_close(logits, original_logits)
    assert all(f"{name}.hook_sae_acts_post" in cache for name in USER_HOOKS) and user_saes(model) == {}


def test_run_with_hooks_reaches_sae_hooks(model, all_saes, original_logits):
    for sae in all_saes:
        model.add_sae(sae)
    counter = Counter()
    logits = model.run_with_hooks(TOKENS, fwd_hooks=[(f"{n}.hook_sae_acts_post", counter.inc) for n in USER_HOOKS])
    assert_not_close(logits, original_logits)
    assert counter.count == len(USER_HOOKS) and len(user_saes(model)) == len(USER_HOOKS)


def test_run_with_hooks_with_saes(model, all_saes, original_logits):
    counter = Counter()
    logits = model.run_with_hooks_with_saes(TOKENS, saes=all_saes, fwd_hooks=[
        (f"{n}.hook_sae_acts_post", counter.inc) for n in USER_HOOKS])
    assert_not_close(logits, original_logits)
    assert counter.count == len(USER_HOOKS) and user_saes(model) == {}


# -- the error term ----------------------------------------------------------------------------------
def test_error_term_keeps_the_output(model, one_sae, original_logits):
    model.add_sae(one_sae, use_error_term=True)
    assert_close(model(TOKENS), original_logits, atol=1e-4)
    assert_close(model.run_with_saes(TOKENS, saes=[]), original_logits, atol=1e-4)


def test_add_sae_sets_use_error_term_on_the_wrapper(model, one_sae):
    name = one_sae.cfg.metadata.hook_name
    for flag, expected in ((True, True), (False, False), (None, False)):
        model.add_sae(one_sae, use_error_term=flag)
        assert wrapper_at(model, name).use_error_term is expected


def test_saes_context_and_run_with_saes_leave_the_saes_setting(model, one_sae, original_logits):
    before = one_sae.use_error_term
    with model.saes(saes=[one_sae], use_error_term=True):
        assert wrapper_at(model, one_sae.cfg.metadata.hook_name).use_error_term is True
    assert_close(model.run_with_saes(TOKENS, saes=[one_sae], use_error_term=True), original_logits, atol=1e-4)
    logits, cache = model.run_with_cache_with_saes(TOKENS, saes=[one_sae], use_error_term=True)
    assert_close(logits, original_logits, atol=1e-4)
    assert f"{one_sae.cfg.metadata.hook_name}.hook_sae_acts_post" in cache
    assert one_sae.use_error_term == before and user_saes(model) == {}


def test_saes_context_restores_after_an_exception(model, one_sae):
    with pytest.raises(RuntimeError):
        with model.saes(saes=[one_sae], use_error_term=True):
            raise RuntimeError("inside")
    assert user_saes(model) == {} and one_sae.use_error_term is False


def test_without_error_term_the_output_changes(model, one_sae, original_logits):
    name = one_sae.cfg.metadata.hook_name
    assert_not_close(model.run_with_saes(TOKENS, saes=[one_sae], use_error_term=False), original_logits)
    _, plain = model.run_with_cache(TOKENS)
    _, cache = model.run_with_cache_with_saes(TOKENS, saes=[one_sae], use_error_term=False)
    assert_not_close(plain[name], cache[f"{name}.hook_sae_output"])


# -- transcoders, hook_z, mlp.hook_in, gradients -------------------------------------------------
def test_transcoders(model, original_logits):
    tc = transcoder(model)
    model.add_sae(tc)
    assert "blocks.0.mlp.hook_in" in model.acts_to_saes
    assert_not_close(model(TOKENS), original_logits)
    model.reset_saes("blocks.0.mlp.hook_in")
    assert isinstance(wrapper_at(model, "blocks.0.mlp.hook_in"), HookPoint)
    assert isinstance(wrapper_at(model, "blocks.0.hook_mlp_out"), HookPoint)
    with model.saes(saes=[tc], use_error_term=True):
        assert_close(model(TOKENS), original_logits, atol=1e-4)
    logits, cache = model.run_with_cache_with_saes(TOKENS, saes=[tc])
    assert_not_close(logits, original_logits)
    assert "blocks.0.hook_mlp_out.hook_sae_acts_post" in cache and user_saes(model) == {}


def test_sae_and_transcoder_together(model, original_logits):
    model.add_sae(sae_at(model, "blocks.0.hook_resid_pre"))
    model.add_sae(transcoder(model))
    assert {"blocks.0.hook_resid_pre", "blocks.0.mlp.hook_in"} <= set(model.acts_to_saes)
    assert_not_close(model(TOKENS), original_logits)


def test_transcoder_gradients_flow(model):
    tc = transcoder(model)
    model.add_sae(tc, use_error_term=False)
    model(TOKENS).sum().backward()
    assert tc.W_enc.grad is not None and tc.W_enc.grad.abs().sum() > 0 and tc.W_dec.grad.abs().sum() > 0


def test_hook_z_saes_reshape(model):
    sae = sae_at(model, "blocks.0.attn.hook_z")
    _, cache = model.run_with_cache_with_saes(TOKENS, saes=[sae], use_error_term=False)
    assert cache["blocks.0.attn.hook_z.hook_sae_output"].shape == (2, 6, model.cfg.n_heads, model.cfg.d_head)


def test_mlp_hook_in_exists_in_every_layer(model):
    _, cache = model.run_with_cache(TOKENS)
    for layer in range(model.cfg.n_layers):
        assert cache[f"blocks.{layer}.mlp.hook_in"].shape == (2, 6, model.cfg.d_model)

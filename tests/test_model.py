import pytest
import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

import tl_featureflow as ff
from tl_featureflow import FlowTransformer, SAEBank, _compat
from tl_featureflow.refs import hook_name, sae_hook_name
from tl_featureflow.synthetic import ARCHITECTURES, D_MODEL, N_LAYERS, make_bank, make_sae, tiny_cfg


@pytest.fixture
def flow(tiny_model) -> FlowTransformer:
    return FlowTransformer.from_hooked(tiny_model)


# ------------------------------------------------------------------------------ from_hooked
def test_from_hooked_shares_weights_and_leaves_the_original_alone(tiny_model, tokens):
    before = tiny_model(tokens)
    torch.testing.assert_close(FlowTransformer.from_hooked(tiny_model, fast_path=False)(tokens), before, rtol=0,
                               atol=0)                              # TransformerLens's own path: bit for bit
    flow = FlowTransformer.from_hooked(tiny_model)
    assert isinstance(flow, ff.FlowTransformer) and flow.fast_path.enabled
    mine = dict(tiny_model.named_parameters())
    for name, param in flow.named_parameters():
        assert param.data_ptr() == mine[name].data_ptr(), name
    torch.testing.assert_close(flow(tokens), before, rtol=0, atol=1e-5)  # the fast path: up to rounding
    flow.attach(make_bank())
    assert isinstance(tiny_model.blocks[1].hook_resid_post, HookPoint)
    assert "blocks.1.hook_resid_post.hook_sae_acts_post" not in tiny_model.hook_dict
    torch.testing.assert_close(tiny_model(tokens), before, rtol=0, atol=0)
    flow.detach()
    assert FlowTransformer.from_hooked(flow) is flow


def test_from_hooked_rejects_non_models():
    with pytest.raises(ff.FeatureFlowError, match="HookedTransformer"):
        FlowTransformer.from_hooked(torch.nn.Linear(3, 3))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ attach
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attach_leaves_logits_unchanged_and_exposes_feature_hooks(flow, tokens, arch):
    clean = flow(tokens)
    bank = make_bank(arch=arch)
    flow.attach(bank)
    assert flow.bank is bank
    for site, layer in bank:
        assert sae_hook_name(site, layer) in flow.hook_dict
    torch.testing.assert_close(flow(tokens), clean, rtol=0, atol=0)  # exact error term
    reading, _ = flow.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_sae_acts_post"))
    torch.testing.assert_close(reading, clean, rtol=0, atol=1e-5)
    flow.detach()


def test_feature_edit_changes_the_site_output_by_delta_times_decoder_row(flow, tokens):
    bank = make_bank()
    flow.attach(bank)
    for site, layer, index, delta in [("res", 1, 7, 2.5), ("mlp", 0, 3, -1.0), ("att", 2, 11, 4.0)]:
        out_name = sae_hook_name(site, layer, "hook_sae_output")
        _, clean = flow.run_with_cache(tokens, names_filter=[out_name])

        def edit(acts, hook, index=index, delta=delta):
            acts[:, 4, index] += delta
            return acts

        with flow.hooks(fwd_hooks=[(sae_hook_name(site, layer), edit)]):
            _, edited = flow.run_with_cache(tokens, names_filter=[out_name])
        expected = clean[out_name].clone()
        expected[:, 4] += delta * bank[site, layer].W_dec[index].detach()
        torch.testing.assert_close(edited[out_name], expected, rtol=0, atol=1e-5)
        untouched = [p for p in range(tokens.shape[1]) if p != 4]
        torch.testing.assert_close(edited[out_name][:, untouched], clean[out_name][:, untouched], rtol=0, atol=0)
    flow.detach()


def test_detach_restores_the_model(flow, tokens):
    names_before = set(flow.hook_dict)
    clean = flow(tokens)
    flow.attach(make_bank())
    flow.detach()
    assert set(flow.hook_dict) == names_before and flow.bank is None
    assert all(isinstance(flow.blocks[layer].hook_mlp_out, HookPoint) for layer in range(N_LAYERS))
    torch.testing.assert_close(flow(tokens), clean, rtol=0, atol=0)
    flow.detach()  # detaching twice is harmless


def test_attached_context_detaches_even_on_exceptions(flow):
    bank = make_bank()
    with pytest.raises(RuntimeError, match="boom"):
        with flow.attached(bank):
            assert flow.bank is bank
            raise RuntimeError("boom")
    assert flow.bank is None and not flow.acts_to_saes


def test_attach_alias_hook_does_not_modify_the_users_sae(flow, tokens):
    sae = make_sae("res", 1, hook="blocks.2.hook_resid_pre")
    flow.attach(SAEBank({("res", 1): sae}))
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    assert hook_name("res", 1) in flow.acts_to_saes
    _, feats = flow.run_with_features(tokens)
    assert feats["res", 1].shape == (2, 12, 48)
    flow.detach()


@pytest.mark.parametrize(
    "bank, match",
    [
        (lambda: make_bank(sites=["res"], layers=[0], d_in=D_MODEL + 8), "d_in=40 but the model has d_model=32"),
        (lambda: make_bank(sites=["mlp"], layers=[1, N_LAYERS]), r"layers \[3\] but the model has 3 layers"),
        (lambda: make_bank(sites=["res"], layers=[0], dtype="float64"), "torch.float64 on cpu but layer 0"),
    ],
)
def test_attach_refuses_a_bank_that_does_not_fit_before_changing_anything(flow, tokens, bank, match):
    clean = flow(tokens)
    names = set(flow.hook_dict)
    with pytest.raises(ff.errors.ModelMismatchError, match=match):
        flow.attach(bank())
    assert set(flow.hook_dict) == names and flow.bank is None
    torch.testing.assert_close(flow(tokens), clean, rtol=0, atol=0)


def test_attach_twice_is_an_error(flow):
    flow.attach(make_bank(layers=[0]))
    with pytest.raises(ff.FeatureFlowError, match="already attached"):
        flow.attach(make_bank(layers=[1]))
    flow.detach()


# ------------------------------------------------------------------------------ features
def test_run_with_features_matches_encoding_the_site_activations(flow, tokens):
    bank = make_bank()
    _, plain = flow.run_with_cache(tokens, names_filter=lambda n: n.endswith(("mlp_out", "attn_out", "resid_post")))
    logits, feats = flow.run_with_features(tokens, bank=bank)
    assert flow.bank is None  # attached for the call only
    torch.testing.assert_close(logits, flow(tokens), rtol=0, atol=1e-5)
    assert set(feats) == set(bank)
    for (site, layer), sae in bank.items():
        expected = sae.encode(plain[hook_name(site, layer)])
        torch.testing.assert_close(feats[site, layer], expected, rtol=0, atol=1e-5)
    assert torch.equal(feats["1/mlp/5"], feats["mlp", 1][..., 5])
    with pytest.raises(ff.UnknownFeatureError):
        feats["1/mlp/99"]


def test_run_with_features_stops_early_when_logits_are_not_needed(flow, tokens):
    bank = make_bank()
    seen = []
    flow.blocks[2].hook_resid_pre.add_hook(lambda x, hook: seen.append(hook.name))
    try:
        logits, feats = flow.run_with_features(tokens, bank=bank, sites=["mlp"], layers=[1], return_logits=False)
    finally:
        flow.reset_hooks()
    assert logits is None and list(feats) == [("mlp", 1)] and seen == []
    with flow.attached(bank):
        full, feats_attached = flow.run_with_features(tokens, layers=[0, 2])
        assert full is not None and set(feats_attached) == {(s, layer) for s in ("res", "mlp", "att") for layer in (0, 2)}
        acts = flow.feature_acts("2/att/3", tokens)
    torch.testing.assert_close(acts, feats_attached["att", 2][..., 3])


def test_run_with_features_needs_a_bank(flow, tokens):
    with pytest.raises(ff.FeatureFlowError, match="no SAE bank"):
        flow.run_with_features(tokens)


# ------------------------------------------------------------------------------ the guard itself
def test_hook_guard_sees_hooks_left_on_a_model(tiny_model, leftover_hooks):
    tiny_model.blocks[0].hook_mlp_out.add_hook(lambda x, hook: x)
    assert leftover_hooks() == ["blocks.0.hook_mlp_out: 1 hook(s)"]
    tiny_model.reset_hooks()
    assert leftover_hooks() == []


def test_plain_transformer_config_variant_works():
    model = HookedTransformer(tiny_cfg(normalization_type="RMS", gated_mlp=True, act_fn="silu", n_key_value_heads=2))
    flow = FlowTransformer.from_hooked(model)
    toks = torch.randint(0, 64, (1, 6))
    with flow.attached(make_bank(layers=[0])):
        torch.testing.assert_close(flow(toks), model(toks), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- interplay with SAELens (issue 11)
def test_in_place_edit_at_hook_sae_error_is_honoured(flow, tokens):
    """TransformerLens lets a hook edit its tensor in place and return None; SAELens honours that."""
    bank = make_bank()
    name, read = hook_name("res", 1), "blocks.2.hook_resid_pre"    # read: the same tensor, entering layer 2
    _, clean = flow.run_with_cache(tokens, names_filter=[read])
    with flow.attached(bank):

        def zero_in_place(error, hook):
            error.mul_(0)          # returns None

        def zero_new(error, hook):
            return error * 0

        results = []
        for fn in (zero_in_place, zero_new):
            with flow.hooks(fwd_hooks=[(f"{name}.hook_sae_error", fn)]):
                _, cache = flow.run_with_cache(tokens, names_filter=[read])
            results.append(cache[read])
    sae = bank["res", 1]
    recons = sae.decode(sae.encode(clean[read]))    # x with its error removed is the reconstruction
    torch.testing.assert_close(results[0], recons, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("how", ["saes", "run_with_saes", "run_with_cache_with_saes"])
def test_sae_lens_temporary_saes_at_a_bank_hook_restore_the_bank_exactly(flow, tokens, how):
    bank = make_bank()
    name = hook_name("mlp", 1)
    other = make_sae("mlp", 1, seed=99)
    with flow.attached(bank):
        wrapper = _compat.sae_wrappers(flow)[name]
        with flow.hooks(fwd_hooks=[(sae_hook_name("mlp", 1), lambda a, hook: a * 0.5)]):
            before = flow(tokens)
        if how == "saes":
            with flow.saes(saes=[other]):
                assert flow.acts_to_saes[name] is other
        elif how == "run_with_saes":
            flow.run_with_saes(tokens, saes=[other])
        else:
            flow.run_with_cache_with_saes(tokens, saes=[other])
        assert _compat.sae_wrappers(flow)[name] is wrapper           # the bank's own exact wrapper is back
        assert torch.equal(flow(tokens), flow.run_with_saes(tokens, saes=[]))
        with flow.hooks(fwd_hooks=[(sae_hook_name("mlp", 1), lambda a, hook: a * 0.5)]):
            assert torch.equal(flow(tokens), before)
        plain_logits = flow(tokens)
    assert torch.equal(plain_logits, flow(tokens))                  # bit-exact, as attach promises


def test_reset_saes_detaches_the_whole_bank(flow, tokens):
    bank = make_bank()
    flow.attach(bank)
    flow.reset_saes()
    assert flow.bank is None and flow.acts_to_saes == {}
    with pytest.raises(ff.FeatureFlowError, match="no SAE bank"):
        flow.run_with_features(tokens)
    flow.attach(bank)                                   # attach works again
    flow.reset_saes(hook_name("att", 2))                # removing one SAE of the bank detaches all of it
    assert flow.bank is None and flow.acts_to_saes == {}
    other = make_sae("res", 0, seed=5)
    flow.add_sae(other)
    flow.attach(make_bank(layers=[1, 2]))
    flow.reset_saes(hook_name("res", 0))                # an SAE outside the bank leaves the bank alone
    assert flow.bank is not None
    flow.detach()


def test_add_sae_over_a_bank_sae_is_reported_not_read_silently(flow, tokens):
    bank = make_bank()
    with flow.attached(bank):
        flow.add_sae(make_sae("res", 1, seed=7))
        with pytest.raises(ff.FeatureFlowError, match="replaced with add_sae"):
            flow.run_with_features(tokens)
    assert flow.acts_to_saes == {}


def test_running_never_swaps_the_hooks_of_the_users_sae(flow, tokens, monkeypatch):
    """SAELens runs an SAE without hooks by swapping its hook points for a no-op module; that
    must happen on the bank's view, never on the user's own SAE object (aliased hook or not)."""
    import sae_lens.saes.sae as sae_module

    user_saes = {("res", 0): make_sae("res", 0, hook="blocks.1.hook_resid_pre"), ("mlp", 1): make_sae("mlp", 1)}
    seen = []

    def watch(module, args, output):
        seen.append([type(s.hook_sae_acts_post).__name__ for s in user_saes.values()])

    handle = sae_module._blank_hook.register_forward_hook(watch)
    try:
        with flow.attached(ff.SAEBank(user_saes)):
            hooks = [(sae_hook_name(*key), lambda a, hook: a) for key in user_saes]
            with flow.hooks(fwd_hooks=hooks):
                flow(tokens)
    finally:
        handle.remove()
    assert seen and all(names == ["HookPoint", "HookPoint"] for names in seen)
    for sae in user_saes.values():
        assert sae.cfg.metadata.hook_name in ("blocks.1.hook_resid_pre", hook_name("mlp", 1))


def test_train_and_eval_skip_only_when_every_module_is_in_that_mode_already(monkeypatch):
    import torch

    from tl_featureflow.synthetic import tiny_model

    model = tiny_model()
    model.eval()
    writes = []
    original = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: writes.append(mode) or original(self, mode))
    assert model.eval() is model and writes == []                     # already in eval mode: nothing written
    model.blocks[1].mlp.train()                                        # one submodule switched on its own
    model.eval()
    assert not any(module.training for module in model.modules())
    assert model.train() is model and all(module.training for module in model.modules())

"""Canaries for every private API of SAELens, TransformerLens and torch that we use.

One test per function of ``tl_featureflow._compat``. When a dependency is upgraded
and one fails, its name and message say which access broke; fix it in ``_compat``
alone. Run this file first when widening a pin in pyproject.toml.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack

import pytest
import torch
from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, HookedSAETransformer
from sae_lens.config import SAETrainerConfig
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_featureflow import _compat
from tl_featureflow.refs import hook_name
from tl_featureflow.synthetic import tiny_cfg


@pytest.fixture
def sae_model() -> HookedSAETransformer:
    torch.manual_seed(0)
    return HookedSAETransformer(tiny_cfg()).eval()


def test_sae_wrapper_is_sae_lens_splice_with_the_attributes_we_use(sae_model, sae_factory):
    sae = sae_factory("res", 0)
    sae_model.add_sae(sae, use_error_term=True)
    wrapper = sae_model.blocks[0].hook_resid_post
    assert type(wrapper) is _compat.SAEWrapper, "HookedSAETransformer.add_sae no longer splices _SAEWrapper"
    assert wrapper.sae is sae and wrapper.use_error_term is True and wrapper.exclude_special_tokens is False
    assert {"hook_sae_error", "hook_sae_output"} <= set(dict(wrapper.named_modules()))
    assert list(inspect.signature(_compat.SAEWrapper.__init__).parameters)[:3] == ["self", "sae", "use_error_term"]
    sae_model.reset_saes()


def test_set_deep_attr_sets_a_dotted_path(sae_model):
    point = HookPoint()
    _compat.set_deep_attr(sae_model, "blocks.1.hook_mlp_out", point)
    assert sae_model.blocks[1].hook_mlp_out is point


def test_disable_sae_hooks_silences_and_restores_every_hook_point(sae_factory):
    sae = sae_factory("res", 0)
    calls = []
    sae.hook_sae_acts_post.add_hook(lambda a, hook: calls.append(1))
    x = torch.randn(2, 32)
    with _compat.disable_sae_hooks(sae):
        sae.encode(x)
        assert not isinstance(sae.hook_sae_acts_post, HookPoint)
    assert calls == [] and isinstance(sae.hook_sae_acts_post, HookPoint)
    sae.encode(x)
    assert calls == [1]
    sae.hook_sae_acts_post.remove_hooks()


def test_wrapper_special_mode_reads_transcoder_capture_and_token_mask(sae_factory):
    wrapper = _compat.SAEWrapper(sae_factory("res", 0), use_error_term=True)
    assert not _compat.wrapper_in_special_mode(wrapper)
    wrapper.set_token_mask(torch.zeros(1, 3, dtype=torch.bool))
    assert _compat.wrapper_in_special_mode(wrapper)
    wrapper.set_token_mask(None)
    wrapper.capture_input(torch.zeros(1, 3, 32))
    assert _compat.wrapper_in_special_mode(wrapper)


def test_sae_wrappers_is_the_live_dict_of_a_hooked_sae_transformer(sae_model, sae_factory):
    sae = sae_factory("mlp", 1)
    sae_model.add_sae(sae)
    wrappers = _compat.sae_wrappers(sae_model)
    assert wrappers[hook_name("mlp", 1)].sae is sae
    wrappers.pop(hook_name("mlp", 1))
    assert sae_model.acts_to_saes == {}, "acts_to_saes no longer reads _acts_to_saes"
    _compat.set_deep_attr(sae_model, hook_name("mlp", 1), HookPoint())
    sae_model.setup()


def test_has_torch_hooks_sees_hooks_of_either_api():
    point = HookPoint()
    assert not _compat.has_torch_hooks(point)
    handle = point.register_forward_hook(lambda m, i, o: None)
    assert _compat.has_torch_hooks(point) and not point.has_hooks()
    handle.remove()
    point.add_hook(lambda a, hook: a)
    assert _compat.has_torch_hooks(point) and point.has_hooks()
    point.remove_hooks()
    assert not _compat.has_torch_hooks(point)


def test_module_view_shares_tensors_but_not_registries(sae_factory):
    sae = sae_factory("res", 0)
    view = _compat.module_view(sae)
    assert view.W_dec is sae.W_dec and view.hook_sae_acts_post is sae.hook_sae_acts_post
    view.hook_sae_acts_post = torch.nn.Identity()
    view.W_dec = torch.nn.Parameter(torch.zeros_like(sae.W_dec))
    assert isinstance(sae.hook_sae_acts_post, HookPoint) and not torch.equal(sae.W_dec, view.W_dec)


def test_set_module_tensor_points_a_parameter_at_a_tensor():
    model = HookedTransformer(tiny_cfg())
    new = torch.nn.Parameter(torch.zeros_like(model.blocks[0].attn.W_Q))
    _compat.set_module_tensor(model, "blocks.0.attn.W_Q", new, "_parameters")
    assert model.blocks[0].attn.W_Q is new and dict(model.named_parameters())["blocks.0.attn.W_Q"] is new
    with pytest.raises(ValueError):
        _compat.set_module_tensor(model, "blocks.0.attn.W_Q", new, "_modules")


def test_wrap_instance_method_restores_the_class_method_or_an_outer_wrapper(tiny_model):
    original = tiny_model.generate
    with ExitStack() as outer:
        _compat.wrap_instance_method(outer, tiny_model, "generate", lambda prev: lambda *a, **k: ("outer", prev))
        outer_fn = tiny_model.generate
        with ExitStack() as inner:
            _compat.wrap_instance_method(inner, tiny_model, "generate", lambda prev: lambda *a, **k: ("inner", prev))
            assert tiny_model.generate()[0] == "inner" and tiny_model.generate()[1] is outer_fn
        assert tiny_model.generate is outer_fn
    assert "generate" not in vars(tiny_model) and tiny_model.generate == original


def test_generate_binds_with_transformer_lens_defaults(tiny_model):
    arguments = _compat.bind_arguments(type(tiny_model).generate, tiny_model, torch.zeros(1, 2, dtype=torch.long))
    assert arguments["use_past_kv_cache"] is True, "HookedTransformer.generate's use_past_kv_cache default changed"
    assert {"max_new_tokens", "do_sample", "top_p", "temperature", "stop_at_eos", "verbose"} <= set(arguments)


def _tiny_multi_trainer(tmp_path):
    cfg = BatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=2, device="cpu")
    saes = {"a": BatchTopKTrainingSAE(cfg)}
    trainer_cfg = SAETrainerConfig(total_training_samples=64, train_batch_size_samples=16, lr=1e-3, lr_end=1e-4,
                                   device="cpu", dead_feature_window=10, feature_sampling_window=10,
                                   n_checkpoints=1, checkpoint_path=str(tmp_path), n_batches_for_norm_estimate=1)
    batches = iter([{"h": torch.randn(16, 8)} for _ in range(4)])
    return _compat.multi_sae_trainer_class()(cfg=trainer_cfg, saes=saes, hook_names={"a": "h"},
                                             data_provider=batches, save_checkpoint_fn=lambda checkpoint_path: None)


def test_multi_sae_trainer_has_the_constructor_and_state_we_drive(tmp_path):
    multi = _tiny_multi_trainer(tmp_path)
    for name in ("trainers", "n_training_steps", "n_training_samples", "checkpoint_thresholds", "data_provider"):
        assert hasattr(multi, name), f"MultiSAETrainer lost {name}"
    assert callable(multi.load_checkpoint) and callable(multi.fit)
    with _compat.quiet_sae_lens_bars():
        trained = multi.fit()
    assert set(trained) == {"a"} and multi.n_training_samples == 64


def test_advance_past_checkpoint_moves_every_counter(tmp_path):
    multi = _tiny_multi_trainer(tmp_path)
    multi.checkpoint_thresholds = [0, 32, 48]
    multi.n_training_samples = 32
    before = [t.n_training_steps for t in multi.trainers.values()], multi.n_training_steps
    _compat.advance_past_checkpoint(multi)
    assert [t.n_training_steps for t in multi.trainers.values()] == [n + 1 for n in before[0]]
    assert multi.n_training_steps == before[1] + 1 and multi.checkpoint_thresholds == [32, 48]


def test_estimate_scaling_factor_sets_the_trainers_scaler(tmp_path):
    multi = _tiny_multi_trainer(tmp_path)
    trainer = multi.trainers["a"]
    _compat.estimate_scaling_factor(trainer, 8, iter([torch.ones(16, 8) * 2.0]), 1)
    assert trainer.activation_scaler.scaling_factor == pytest.approx(8 ** 0.5 / (2.0 * 8 ** 0.5))


def test_replace_train_step_makes_fit_call_ours_with_sae_and_scaled_batch(tmp_path):
    multi = _tiny_multi_trainer(tmp_path)
    trainer = multi.trainers["a"]
    theirs, seen = trainer._train_step, []

    def ours(sae, sae_in):
        seen.append((sae is trainer.sae, tuple(sae_in.shape)))
        return theirs(sae=sae, sae_in=sae_in)      # SAELens's signature: _train_step(sae, sae_in)

    _compat.replace_train_step(trainer, ours)
    with _compat.quiet_sae_lens_bars():
        multi.fit()
    assert seen == [(True, (16, 8))] * 4
    assert type(trainer)._train_step is not ours      # the class is untouched


def test_quiet_sae_lens_bars_replaces_and_restores_tqdm():
    import sae_lens.training.activation_scaler as scaler
    import sae_lens.training.multi_sae_trainer as trainer

    before = (scaler.tqdm, trainer.tqdm)
    with _compat.quiet_sae_lens_bars():
        assert (scaler.tqdm, trainer.tqdm) != before
        assert trainer.tqdm(range(3)).disable
    assert (scaler.tqdm, trainer.tqdm) == before


def test_sae_lens_saes_context_restores_a_displaced_sae_through_add_sae(sae_model, sae_factory):
    """Why FlowTransformer.saes restores its bank itself: SAELens re-adds the displaced SAE
    in a new plain wrapper. If this changes, the restore in model.py may become unnecessary."""
    first, second = sae_factory("res", 0, seed=1), sae_factory("res", 0, seed=2)
    sae_model.add_sae(first, use_error_term=True)
    wrapper = _compat.sae_wrappers(sae_model)[hook_name("res", 0)]
    with sae_model.saes(saes=[second]):
        assert sae_model.acts_to_saes[hook_name("res", 0)] is second
    restored = _compat.sae_wrappers(sae_model)[hook_name("res", 0)]
    assert restored.sae is first and restored is not wrapper and type(restored) is _compat.SAEWrapper
    sae_model.reset_saes()


def test_sae_lens_gives_mlps_an_instance_forward_through_hook_in(sae_model):
    mlp = sae_model.blocks[0].mlp
    assert "forward" in vars(mlp) and hasattr(mlp, "hook_in"), "add_hook_in_to_mlp changed"
    calls = []
    _compat.set_mlp_forward(mlp, lambda x: calls.append(x.shape) or x * 0)
    mlp.hook_in.add_hook(lambda a, hook: calls.append("hook_in"))
    out = mlp(torch.ones(1, 2, 32))
    assert calls == ["hook_in", (1, 2, 32)] and not out.any()
    mlp.hook_in.remove_hooks()


def test_grouped_query_attention_stores_kv_unexpanded():
    model = HookedTransformer(tiny_cfg(n_key_value_heads=2))
    attn = model.blocks[0].attn
    W_K, b_K, W_V, b_V = _compat.stored_kv_weights(attn)
    assert W_K.shape == (2, 32, 8) and b_V.shape == (2, 8), "GroupedQueryAttention no longer stores _W_K"
    assert W_K is attn._W_K and torch.equal(attn.W_K, W_K.repeat_interleave(2, dim=0))
    plain = HookedTransformer(tiny_cfg()).blocks[0].attn
    assert _compat.stored_kv_weights(plain)[0] is plain.W_K


def test_fuse_adam_gives_torchs_fused_step_and_survives_a_resume(tmp_path):
    multi = _tiny_multi_trainer(tmp_path)
    trainer = multi.trainers["a"]
    params = list(trainer.sae.parameters())
    start = [p.detach().clone() for p in params]
    reference = [torch.nn.Parameter(p.clone()) for p in start]
    group = trainer.optimizer.param_groups[0]
    fused = torch.optim.Adam(reference, lr=group["lr"], betas=group["betas"], fused=True)
    assert _compat.fuse_adam(trainer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for mine, ref in zip(params, reference, strict=True):
            mine.grad = torch.randn(mine.shape, generator=gen)
            ref.grad = mine.grad.clone()
        trainer.optimizer.step()
        fused.step()
    assert all(torch.equal(m.detach(), r.detach()) for m, r in zip(params, reference, strict=True))
    assert not all(torch.equal(m.detach(), s) for m, s in zip(params, start, strict=True))
    resumed = torch.optim.Adam(reference, lr=group["lr"])                 # SAELens's default, then its saved state
    resumed.load_state_dict(trainer.optimizer.state_dict())
    assert resumed.param_groups[0]["fused"] is True

"""Every access to private APIs of SAELens, TransformerLens and torch, in one place.

Nothing else in tl_featureflow reaches into a dependency's underscored names or
monkeypatches its modules: it calls the functions here. Each one has a canary test in
``tests/test_compat.py`` that says exactly what broke when a dependency changes, so
the pins in ``pyproject.toml`` can be widened with confidence: run that file against
the new version first.

What we rely on, and why:

- SAELens ``_SAEWrapper`` (the splice that ``HookedSAETransformer.add_sae`` puts at a
  hook) is subclassed by ``model._ExactSAEWrapper`` so that the error term is exact;
  its ``_captured_input`` / ``_token_mask`` say when SAELens's own transcoder and
  special-token paths are in use (then we defer to SAELens). ``_acts_to_saes`` holds
  the wrappers of a ``HookedSAETransformer``; ``_disable_hooks`` runs an SAE without
  its hooks (the clean reconstruction of the error term).
- SAELens ``MultiSAETrainer`` (not exported) trains every SAE of a bank from one
  activation stream; resuming edits its step counters, and its tqdm bars are
  silenced in favour of ours.
- torch ``nn.Module``'s ``_modules`` / ``_parameters`` / ``_buffers`` dicts (a shallow
  view of an SAE that never touches the user's object; sharing a model's tensors) and
  ``_forward_hooks`` / ``_forward_pre_hooks`` (hooks registered on a HookPoint with
  torch's API rather than TransformerLens's).
- TransformerLens ``HookedTransformer.generate``: the Steerer wraps it on the model
  instance while active and reads its arguments with ``inspect.signature``.
- The fast path (``fastpath.py``): SAELens's HookedSAETransformer gives every MLP an
  instance ``forward`` that calls ``mlp.hook_in`` first (we replace it, keeping that
  call); TransformerLens's grouped-query attention stores K/V weights unexpanded as
  ``_W_K`` / ``_b_K`` / ``_W_V`` / ``_b_V``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper, set_deep_attr
from sae_lens.saes.sae import _disable_hooks

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

__all__ = [
    "SAEWrapper",
    "set_deep_attr",
    "disable_sae_hooks",
    "wrapper_in_special_mode",
    "sae_wrappers",
    "has_torch_hooks",
    "module_view",
    "add_permanent_hook",
    "set_module_tensor",
    "wrap_instance_method",
    "bind_arguments",
    "set_mlp_forward",
    "tensor_stamp",
    "stored_kv_names",
    "stored_kv_weights",
    "multi_sae_trainer_class",
    "advance_past_checkpoint",
    "estimate_scaling_factor",
    "quiet_sae_lens_bars",
]

SAEWrapper = _SAEWrapper
"""SAELens's splice of an SAE at a hook (``sae_lens.analysis.hooked_sae_transformer._SAEWrapper``)."""


# -- SAELens: the HookedSAETransformer splice ---------------------------------------------------
def disable_sae_hooks(sae: Any) -> Any:
    """Context manager: run ``sae`` with every hook point replaced by a no-op (SAELens's own)."""
    return _disable_hooks(sae)


def wrapper_in_special_mode(wrapper: Any) -> bool:
    """True while SAELens's transcoder input capture or special-token mask is in use."""
    return wrapper._captured_input is not None or wrapper._token_mask is not None


def sae_wrappers(model: HookedSAETransformer) -> dict[str, Any]:
    """The live ``hook name -> wrapper`` dict of a HookedSAETransformer (mutations are seen by it)."""
    return model._acts_to_saes


# -- torch: modules --------------------------------------------------------------------------------
def has_torch_hooks(module: torch.nn.Module) -> bool:
    """Whether torch-level forward (pre-)hooks are registered on ``module`` (any API)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def module_view(module: torch.nn.Module) -> Any:
    """A shallow copy sharing parameters, buffers and submodules, with dicts of its own.

    Setting an attribute on the view (a submodule, parameter, buffer or plain value)
    leaves ``module`` untouched, unlike ``copy.copy``, which shares the registries.
    """
    view = copy.copy(module)
    for registry in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(view, registry, dict(getattr(module, registry)))
    return view


def set_module_tensor(root: torch.nn.Module, name: str, value: torch.Tensor, kind: str) -> None:
    """Point the parameter (``kind="_parameters"``) or buffer (``"_buffers"``) ``name`` of ``root`` at ``value``."""
    if kind not in ("_parameters", "_buffers"):
        raise ValueError(f"kind must be '_parameters' or '_buffers', got {kind!r}")
    module_name, _, leaf = name.rpartition(".")
    getattr(root.get_submodule(module_name), kind)[leaf] = value


# -- TransformerLens: hook points ------------------------------------------------------------------
def add_permanent_hook(point: Any, fn: Callable) -> Callable[[], None]:
    """Add ``fn`` to TransformerLens HookPoint ``point`` as a permanent forward hook (kept by ``model.hooks()``
    and ``reset_hooks()``); returns a function removing exactly that hook (TransformerLens can only remove
    every permanent hook of a point at once). Reads the ``LensHandle`` that ``add_hook`` appends to ``fwd_hooks``."""
    point.add_hook(fn, dir="fwd", is_permanent=True)
    handle = point.fwd_hooks[-1]

    def remove() -> None:
        handle.hook.remove()
        if handle in point.fwd_hooks:
            point.fwd_hooks.remove(handle)

    return remove


# -- TransformerLens: generate ---------------------------------------------------------------------
def wrap_instance_method(stack: ExitStack, obj: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``obj.name`` by ``make(current)`` on the instance until ``stack`` closes.

    An attribute the instance already had (a wrapper of an outer context) is restored;
    otherwise the instance attribute is removed, so the class's method shows again.
    """
    had_own = name in vars(obj)
    previous = getattr(obj, name)
    obj.__dict__[name] = make(previous)

    def restore() -> None:
        if had_own:
            obj.__dict__[name] = previous
        else:
            obj.__dict__.pop(name, None)

    stack.callback(restore)


def bind_arguments(function: Callable, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
    """The arguments a call would receive, defaults applied (``inspect.signature(f).bind``)."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


# -- the fast path ---------------------------------------------------------------------------------------
def _through_hook_in(mlp: Any, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return forward(mlp.hook_in(x))


def set_mlp_forward(mlp: Any, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make ``forward`` the MLP's forward, behind ``mlp.hook_in`` as SAELens wires it.

    ``HookedSAETransformer`` adds ``mlp.hook_in`` and an instance ``forward`` calling it
    (``sae_lens.analysis.hooked_sae_transformer.add_hook_in_to_mlp``); a partial, unlike
    SAELens's lambda, follows the module through ``copy.deepcopy``.
    """
    if hasattr(mlp, "hook_in"):
        mlp.forward = functools.partial(_through_hook_in, mlp, forward)
    else:
        mlp.forward = forward


def tensor_stamp(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Changes whenever ``tensor``'s values may have: another object or storage, or an in-place edit
    (torch's ``Tensor._version`` counter)."""
    return id(tensor), tensor.data_ptr(), tensor._version, tensor.device, tensor.dtype


def stored_kv_names(attn: Any) -> tuple[str, str, str, str]:
    """Attribute names of ``(W_K, b_K, W_V, b_V)`` as stored: the unexpanded ``[n_key_value_heads, ...]``
    ones of grouped-query attention (its public ``W_K`` repeats the heads on every read), else the public."""
    if "_W_K" in attn._parameters and not attn.cfg.ungroup_grouped_query_attention:
        return "_W_K", "_b_K", "_W_V", "_b_V"
    return "W_K", "b_K", "W_V", "b_V"


def stored_kv_weights(attn: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_K, b_K, W_V, b_V)`` as stored (see :func:`stored_kv_names`)."""
    return tuple(getattr(attn, name) for name in stored_kv_names(attn))  # type: ignore[return-value]


# -- SAELens: training ---------------------------------------------------------------------------------
def multi_sae_trainer_class() -> type:
    """SAELens's ``MultiSAETrainer`` (``sae_lens.training.multi_sae_trainer``, not exported)."""
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    return MultiSAETrainer


def advance_past_checkpoint(multi: Any) -> None:
    """After ``multi.load_checkpoint``: count the step the checkpoint was saved in as done.

    SAELens saves checkpoints inside the step, before the step counters advance, so a
    resumed run would repeat that step; checkpoints already passed are dropped.
    """
    for trainer in multi.trainers.values():
        trainer.n_training_steps += 1
    multi.n_training_steps += 1
    multi.checkpoint_thresholds = [t for t in multi.checkpoint_thresholds if t >= multi.n_training_samples]


def replace_train_step(trainer: Any, step: Callable[[Any, torch.Tensor], Any]) -> None:
    """Make one SAELens ``SAETrainer`` call ``step(sae, sae_in)`` in place of its private
    ``_train_step(sae, sae_in)`` (on this instance only; ``fit`` and checkpoints stay SAELens's)."""
    trainer._train_step = step


def fuse_adam(trainer: Any) -> bool:
    """Make one SAELens ``SAETrainer``'s Adam take torch's fused step (one kernel per tensor
    instead of ~10 elementwise passes; SAELens builds it with the default). Returns whether it
    did: only for the CPU and CUDA, where torch has the fused kernel. The optimiser, its state
    and its scheduler stay SAELens's; the flag is saved with the optimiser's state, so a
    resumed run keeps it."""
    optimizer = trainer.optimizer
    devices = {p.device.type for group in optimizer.param_groups for p in group["params"]}
    if not isinstance(optimizer, torch.optim.Adam) or not devices <= {"cpu", "cuda"}:
        return False
    for group in optimizer.param_groups:
        group["foreach"], group["fused"] = False, True
    return True


def estimate_scaling_factor(trainer: Any, d_in: int, batches: Iterator[torch.Tensor], n_batches: int) -> None:
    """Let one SAELens trainer's activation scaler estimate its normalisation factor."""
    trainer.activation_scaler.estimate_scaling_factor(d_in=d_in, data_provider=batches,
                                                      n_batches_for_norm_estimate=n_batches)


@contextmanager
def quiet_sae_lens_bars() -> Iterator[None]:
    """Silence SAELens's own tqdm bars (training, norm estimation) while ours show progress."""
    import sae_lens.training.activation_scaler as scaler
    import sae_lens.training.multi_sae_trainer as trainer

    saved = [(module, module.tqdm) for module in (scaler, trainer)]
    try:
        for module, original in saved:
            module.tqdm = lambda *a, _t=original, **k: _t(*a, **{**k, "disable": True})
        yield
    finally:
        for module, original in saved:
            module.tqdm = original

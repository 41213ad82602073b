"""FlowTransformer: a HookedTransformer with an SAE bank spliced in at every layer.

``attach(bank)`` splices each SAE of the bank in at its site's hook the way
SAELens's ``HookedSAETransformer.add_sae`` does, with an exact error term, so the
model's outputs do not change (bit for bit), while ``blocks.{L}.hook_resid_post.hook_sae_acts_post`` (and the MLP
and attention equivalents) become ordinary TransformerLens hook points: editing a
feature's activation there changes the site's output by exactly
``delta_activation * W_dec[feature]``.

>>> import torch
>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> bank, _ = planted_chain_bank()
>>> model = FlowTransformer.from_hooked(tiny_model())   # any HookedTransformer; weights shared
>>> tokens = torch.arange(1, 9)[None]
>>> with model.attached(bank):
...     logits, feats = model.run_with_features(tokens)
...     torch.equal(logits, model.run_with_saes(tokens, saes=[]))   # outputs unchanged, bit for bit
True
>>> feats["res", 2].shape, feats["2/res/1"].shape   # [batch, pos, d_sae]; one feature: [batch, pos]
(torch.Size([1, 8, 12]), torch.Size([1, 8]))
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE, HookedSAETransformer
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_featureflow import _compat, fastpath
from tl_featureflow.checks import check_int, check_tokens
from tl_featureflow.errors import (
    InvalidArgumentError,
    ModelMismatchError,
    StateError,
    UnknownFeatureError,
)
from tl_featureflow.refs import FeatureRef, Key, Site, block_of
from tl_featureflow.saes import sites
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.preflight import preflight_on_load

__all__ = ["FlowTransformer", "FeatureCache"]



class FeatureCache(Mapping[Key, Float[Tensor, "batch pos d_sae"]]):
    """Feature activations of one forward pass, keyed by ``(site, layer)``.

    ``cache["res", 3]`` is ``[batch, pos, d_sae]``; ``cache[FeatureRef(3, "res", 7)]``
    (or ``cache["3/res/7"]``) is the ``[batch, pos]`` activation of one feature.
    """

    def __init__(self, acts: Mapping[Key, Tensor]):
        self._acts = dict(acts)

    def __getitem__(self, key: Key | FeatureRef | str) -> Tensor:  # type: ignore[override]
        if isinstance(key, (FeatureRef, str)):
            ref = FeatureRef.parse(key)
            acts = self[ref.key]
            if ref.index >= acts.shape[-1]:
                raise UnknownFeatureError(f"feature {ref} does not exist: d_sae is {acts.shape[-1]}")
            return acts[..., ref.index]
        try:
            return self._acts[key]
        except (KeyError, TypeError):
            raise UnknownFeatureError(f"no feature activations for {key!r}: the cache has {list(self._acts)}") from None

    def __iter__(self) -> Iterator[Key]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._acts.items()}
        return f"FeatureCache({shapes})"


def _view_at(sae: SAE, name: str) -> SAE:
    """A view of ``sae`` (same parameters and hook points) whose hook is ``name``.

    The bank splices views, never the user's SAE objects: the view has registries of
    its own (:func:`~tl_featureflow._compat.module_view`), so running it without hooks
    (which swaps its hook points for no-ops) or renaming its hook leaves the user's
    object untouched, while hooks added to its hook points are the user's SAE's own.
    """
    view = _compat.module_view(sae)
    if getattr(view, "hook_z_reshaping_mode", False):
        # SAELens's hook_z reshaping keeps state on the SAE (d_head, set by the first encode): the view takes
        # the heads flattened instead (sites.sae_input), on its own attributes
        view.turn_off_forward_pass_hook_z_reshaping()
    if sae.cfg.metadata.hook_name != name:
        cfg = copy.copy(sae.cfg)
        cfg.metadata = SAEMetadata(**{**sae.cfg.metadata.to_dict(), "hook_name": name})
        object.__setattr__(view, "cfg", cfg)
    return view


def _has_hooks(point: torch.nn.Module) -> bool:
    return point.has_hooks() or _compat.has_torch_hooks(point)  # type: ignore[operator]


class _ExactSAEWrapper(_compat.SAEWrapper):
    """SAELens's SAE splice with the error term, written so that it is exact.

    SAELens returns ``sae_out + (x - sae_out_clean)``, which differs from ``x`` by float
    rounding. This wrapper returns ``x + (sae_out - sae_out_clean)``: bit-identical to
    ``x`` when nothing edits the SAE's hooks (then the SAE is not even run), and
    ``x + (delta acts) @ W_dec`` when a hook edits the feature activations. Gradients
    match the unspliced model's too (both reconstructions carry them). Edits at
    ``hook_sae_error`` are added on top, whether the hook returns a new tensor or
    edits the error in place and returns None (as TransformerLens allows).
    """

    def __init__(self, sae: SAE, use_error_term: bool = False):
        super().__init__(sae, use_error_term=use_error_term)
        self._bank_input: Tensor | None = None   # a transcoder's input, kept by a hook at its input hook

    def keep_input(self, x: Tensor, hook: Any) -> None:
        """A hook for a transcoder's input hook: keeps the tensor its encoder reads at this splice, later
        in the same forward (SAELens's own ``capture_input`` would switch to its inexact splice)."""
        self._bank_input = x

    def _hooked(self) -> bool:
        points = [*self.sae.hook_dict.values(), self.hook_sae_error, self.hook_sae_output]
        return any(_has_hooks(p) for p in points)

    def forward(self, original_output: Tensor) -> Tensor:
        if _compat.wrapper_in_special_mode(self):
            return super().forward(original_output)
        kept, self._bank_input = self._bank_input, None
        if not self._hooked():
            return original_output
        sae = self.sae
        # hook_z: the heads flattened where the SAE wants it; a transcoder reads its kept input
        x = sites.sae_input(sae, original_output if kept is None else kept)
        sae_out = sae.decode(sae.encode(x))
        with _compat.disable_sae_hooks(sae):
            clean = sae.decode(sae.encode(x))
        out = original_output + (sae_out - clean).reshape(original_output.shape).to(original_output.dtype)
        if _has_hooks(self.hook_sae_error):
            error = original_output - clean.reshape(original_output.shape)
            before = error.clone()       # the hook may edit ``error`` in place (and returns None)
            out = out + (self.hook_sae_error(error) - before)
        return self.hook_sae_output(out)


class FlowTransformer(HookedSAETransformer):
    """A ``HookedSAETransformer`` that carries an :class:`SAEBank` at every layer.

    Build one with :meth:`from_hooked` (wrapping a model you already have, sharing its
    weights), with :func:`tl_featureflow.load_embedded_model`, or like any
    HookedTransformer.
    """

    def __init__(self, *args: Any, fast_path: bool | fastpath.Mode = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._bank: SAEBank | None = None
        self._bank_wrappers: dict[str, _ExactSAEWrapper] = {}
        self._bank_keepers: list[Any] = []     # removers of the transcoders' input hooks
        self.fast_path: fastpath.FastPath = fastpath.FastPath(enabled=False)
        self.use_fast_path(fast_path)

    def use_fast_path(self, on: bool | fastpath.Mode = True) -> FlowTransformer:
        """Turn the fast path (:mod:`tl_featureflow.fastpath`) on or off; returns the model.

        On by default: the same maths as TransformerLens without its per-step weight
        copies (generation several times faster). ``True`` or ``"views"``: no extra
        memory, results equal up to float rounding; ``"exact"``: the weights stored once in
        the memory order TransformerLens copies them into (same values, other strides; shared
        with a wrapped HookedTransformer, whose own outputs stay the same), results bit for bit. Components it cannot serve keep TransformerLens's
        path, said once in a warning; ``model.fast_path`` tells which.
        """
        mode = "views" if on is True else on
        self.fast_path = fastpath.enable(self, mode) if on else fastpath.disable(self)
        if on and self.fast_path.fallback:
            warnings.warn(f"fast path: these components keep TransformerLens's slower path: "
                          f"{', '.join(self.fast_path.fallback)}", stacklevel=2)
        return self

    def train(self, mode: bool = True) -> FlowTransformer:
        """``nn.Module.train``, a no-op when every module is in that mode already.

        TransformerLens's ``generate`` calls ``eval()`` on every call, which sets the flag on each of
        the model's modules (~2,900 on SmolLM2, hook points included) through ``nn.Module.__setattr__``;
        reading the flags is cheaper than writing them (docs/performance.md, "Generation").
        """
        if isinstance(mode, bool) and all(module.training is mode for module in self.modules()):
            return self
        return super().train(mode)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_hooked(cls, model: HookedTransformer, *, fast_path: bool | fastpath.Mode | None = None) -> FlowTransformer:
        """Wrap an existing HookedTransformer; parameters and buffers are shared, not copied.

        The new model has its own module tree and hook points (so attaching SAEs to it
        leaves ``model`` untouched) built on the meta device, then pointed at
        ``model``'s tensors. Hooks already on ``model`` are not carried over.

        ``fast_path``: ``None`` (default) returns a FlowTransformer as is and wraps any other
        model with the fast path's ``"views"`` mode (outputs equal ``model``'s up to float
        rounding, :mod:`tl_featureflow.fastpath`); ``"exact"`` or ``False`` give outputs bit
        for bit. Given explicitly, a FlowTransformer is wrapped too: a twin on another path
        that shares its weights.
        """
        if isinstance(model, cls) and fast_path is None:
            return model
        fast_path = True if fast_path is None else fast_path
        if not isinstance(model, HookedTransformer):
            raise InvalidArgumentError(f"from_hooked needs a transformer_lens.HookedTransformer, got {type(model).__name__}")
        if isinstance(model, HookedSAETransformer) and model.acts_to_saes:
            raise StateError(
                f"the model has SAEs attached at {sorted(model.acts_to_saes)}: call model.reset_saes() first"
            )
        cfg = copy.deepcopy(model.cfg)
        tokenizer_name, cfg.tokenizer_name = cfg.tokenizer_name, None  # never reload from a hub
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            new = cls(cfg, tokenizer=None, move_to_device=False, fast_path=fast_path)
        new.cfg.tokenizer_name = tokenizer_name
        new.tokenizer = model.tokenizer
        for kind, theirs, ours in (
            ("_parameters", dict(model.named_parameters()), dict(new.named_parameters())),
            ("_buffers", dict(model.named_buffers()), dict(new.named_buffers())),
        ):
            if set(theirs) != set(ours):
                raise ModelMismatchError(
                    f"cannot wrap {type(model).__name__}: its {kind.strip('_')} differ from a "
                    f"HookedTransformer of the same cfg ({sorted(set(theirs) ^ set(ours))[:5]})"
                )
            for name, tensor in theirs.items():
                _compat.set_module_tensor(new, name, tensor, kind)
        new.train(model.training)
        new.setup()
        return new

    # -- SAE bank ------------------------------------------------------------------------------
    @property
    def bank(self) -> SAEBank | None:
        """The attached bank, or None."""
        return self._bank

    def check_bank(self, bank: SAEBank) -> None:
        """Raise ModelMismatchError unless every SAE of ``bank`` fits this model."""
        if not isinstance(bank, SAEBank):
            raise InvalidArgumentError(f"expected an SAEBank, got {type(bank).__name__}")
        bank = bank.bind(self)          # z-SAEs: n_heads * d_head checked here
        if bank.d_model != self.cfg.d_model:
            raise ModelMismatchError(
                f"the bank's SAEs read d_in={bank.d_model} but the model has d_model={self.cfg.d_model}"
            )
        too_deep = [layer for layer in bank.layers if layer >= self.cfg.n_layers]
        if too_deep:
            raise ModelMismatchError(
                f"the bank has SAEs at layers {too_deep} but the model has {self.cfg.n_layers} layers "
                f"(0-{self.cfg.n_layers - 1})"
            )
        for (site, layer), sae in bank.items():
            name = bank.hook((site, layer))
            if name not in self.hook_dict and name not in _compat.sae_wrappers(self):
                raise ModelMismatchError(f"the model has no hook {name!r} for the SAE at {(site, layer)}")
            block_param = next(self.blocks[block_of(layer)].parameters())    # the embedding SAE: block 0
            if sae.W_dec.device != block_param.device or sae.W_dec.dtype != block_param.dtype:
                raise ModelMismatchError(
                    f"the SAE at {(site, layer)} is {sae.W_dec.dtype} on {sae.W_dec.device} but layer {layer} "
                    f"of the model is {block_param.dtype} on {block_param.device}: use bank.to(device, dtype)"
                )

    def attach(self, bank: SAEBank, *, preflight: bool = True) -> None:
        """Splice every SAE of ``bank`` in at its site's hook, with the error term on.

        A bank of SAELens releases (:meth:`SAEBank.from_pretrained`) is preflighted on its first
        attach to this model: a :class:`~tl_featureflow.saes.preflight.PreflightWarning` names each
        SAE that does not reconstruct its site here (:func:`~tl_featureflow.saes.preflight.preflight_on_load`;
        ``preflight=False`` or ``TL_FEATUREFLOW_PREFLIGHT=0`` skip it).

        A transcoder is spliced at ``hook_mlp_out`` (:meth:`SAEBank.hook`); a permanent hook at its input
        hook (:meth:`SAEBank.read_hook`, earlier in the block) keeps what its encoder reads.

        The model's outputs are unchanged (up to float rounding); the SAEs' hooks
        (``<site hook>.hook_sae_acts_post`` etc.) become addressable. Everything is
        checked before anything is changed.

        Raises:
            FeatureFlowError: a bank is attached already (call :meth:`detach`).
            ModelMismatchError: ``d_in`` differs from ``d_model``, a layer exceeds the
                model's, or an SAE's device/dtype differs from its layer's.
        """
        if self._bank is not None:
            raise StateError(f"a bank is already attached ({self._bank.describe()}): call detach() first")
        self.check_bank(bank)
        wrappers = _compat.sae_wrappers(self)
        taken = [bank.hook(key) for key in bank if bank.hook(key) in wrappers]
        if taken:
            raise StateError(f"other SAEs are attached at {taken}: remove them with reset_saes() first")
        preflight_on_load(self, bank, enabled=preflight)      # before the splice: it measures the model's tensors
        added: dict[str, _ExactSAEWrapper] = {}
        keepers: list[Any] = []
        try:
            for key, sae in bank.items():
                name = bank.hook(key)
                # What HookedSAETransformer.add_sae does, with the exact wrapper around a view.
                added[name] = _ExactSAEWrapper(_view_at(sae, bank.read_hook(key)), use_error_term=True)
                self._install(name, added[name])
                if bank.read_hook(key) != name:     # a transcoder: its input is kept as the forward passes it
                    keepers.append(_compat.add_permanent_hook(self.hook_dict[bank.read_hook(key)],
                                                              added[name].keep_input))
            self.setup()
        except BaseException:
            for remove in keepers:
                remove()
            if added:
                super().reset_saes(list(added))
            raise
        self._bank, self._bank_wrappers, self._bank_keepers = bank, added, keepers

    def detach(self) -> None:
        """Remove the attached bank's SAEs, restoring the original hook points."""
        if self._bank is None:
            return
        names = [name for name in self._bank_wrappers if name in _compat.sae_wrappers(self)]
        for remove in self._bank_keepers:
            remove()
        self._bank, self._bank_wrappers, self._bank_keepers = None, {}, []
        if names:
            super().reset_saes(names)

    def _install(self, name: str, wrapper: _ExactSAEWrapper) -> None:
        _compat.sae_wrappers(self)[name] = wrapper
        _compat.set_deep_attr(self, name, wrapper)

    def _bank_intact(self) -> bool:
        wrappers = _compat.sae_wrappers(self)
        return all(wrappers.get(name) is wrapper for name, wrapper in self._bank_wrappers.items())

    # -- SAELens's SAE management, kept consistent with the bank ----------------------------------
    @contextmanager
    def saes(self, saes: SAE | list[SAE] = [], reset_saes_end: bool = True,  # noqa: B006 - SAELens's signature
             use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
             ) -> Iterator[FlowTransformer]:
        """SAELens's temporary SAEs; an attached bank's SAEs come back exactly as they were.

        SAELens restores an SAE it displaced by re-adding it through ``add_sae``, which
        would wrap a bank SAE in its plain (not bit-exact) wrapper. The bank's own
        wrappers are put back instead.
        """
        try:
            with super().saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term,
                              exclude_special_tokens=exclude_special_tokens):
                yield self
        finally:
            if reset_saes_end:
                self._restore_bank()

    def _restore_bank(self) -> None:
        wrappers = _compat.sae_wrappers(self)
        displaced = [name for name, wrapper in self._bank_wrappers.items() if wrappers.get(name) is not wrapper]
        if not displaced:
            return
        super().reset_saes([name for name in displaced if name in wrappers])
        for name in displaced:
            self._install(name, self._bank_wrappers[name])
        self.setup()

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """SAELens's ``reset_saes``; removing any SAE of an attached bank detaches the whole bank.

        A bank is attached all or nothing (``model.bank`` is then None and
        :meth:`run_with_features` needs a bank again).
        """
        names = [act_names] if isinstance(act_names, str) else act_names
        touches_bank = names is None or any(name in self._bank_wrappers for name in names)
        super().reset_saes(act_names)
        if self._bank is not None and touches_bank:
            self.detach()

    @contextmanager
    def attached(self, bank: SAEBank, *, preflight: bool = True) -> Iterator[FlowTransformer]:
        """``with model.attached(bank): ...`` attaches for the block and always detaches (``preflight``: as
        for :meth:`attach`)."""
        self.attach(bank, preflight=preflight)
        try:
            yield self
        finally:
            self.detach()

    # -- running -------------------------------------------------------------------------------
    @functools.wraps(HookedTransformer.generate)   # TransformerLens's signature (the Steerer binds by it)
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """TransformerLens's ``generate``, refused up front when prompt + ``max_new_tokens`` exceed ``n_ctx``
        (TransformerLens fails part-way with a bare RuntimeError and leaves its rotary buffers as inference
        tensors, which breaks later forwards with gradients)."""
        arguments = _compat.bind_arguments(HookedTransformer.generate, self, *args, **kwargs)
        prompt, new = arguments["input"], arguments["max_new_tokens"]
        check_int(new, "max_new_tokens")
        if isinstance(prompt, (str, list)):
            n_prompt = self.to_tokens(prompt, prepend_bos=arguments["prepend_bos"],
                                      padding_side=arguments["padding_side"]).shape[1]
        else:
            n_prompt = int(prompt.shape[1])
        if n_prompt + new > self.cfg.n_ctx:
            raise InvalidArgumentError(f"generate: a prompt of {n_prompt} tokens plus max_new_tokens={new} is past "
                                       f"the model's context of {self.cfg.n_ctx} (cfg.n_ctx): shorten the prompt or "
                                       f"ask for at most {max(0, self.cfg.n_ctx - n_prompt)} new tokens")
        return super().generate(*args, **kwargs)

    def run_with_features(
        self,
        tokens: Tensor | str | list[str],
        *,
        sites: Iterable[Site] | None = None,
        layers: Iterable[int] | None = None,
        bank: SAEBank | None = None,
        return_logits: bool = True,
        **forward_kwargs: Any,
    ) -> tuple[Float[Tensor, "batch pos d_vocab"] | None, FeatureCache]:
        """Run the model and return its logits and the feature activations of chosen SAEs.

        Args:
            tokens: token ids ``[batch, pos]`` or text, as for ``model(...)``.
            sites, layers: which SAEs to read (default: all of the bank).
            bank: the SAEs to use when none is attached; they are attached for this
                call only (just the selected ones).
            return_logits: when False, the forward pass stops after the last layer
                read (``stop_at_layer``) and None is returned in place of logits.

        Returns:
            ``(logits, FeatureCache)``, activations ``[batch, pos, d_sae]`` per SAE.
        """
        if bank is not None and self._bank is not None and bank is not self._bank:
            raise StateError("another bank is attached: detach() it or call without bank=")
        if self._bank is not None and not self._bank_intact():
            raise StateError(
                "the attached bank's SAEs were replaced with add_sae(): detach() and attach(bank) again, "
                "or use model.saes(...) for a temporary swap")
        source = self._bank if self._bank is not None else bank
        if source is None:
            raise StateError("no SAE bank: attach(bank) first or pass bank=")
        if isinstance(tokens, Tensor):
            check_tokens(tokens, self.cfg.d_vocab, n_ctx=self.cfg.n_ctx)
        chosen = source.select(sites=sites, layers=layers)
        names = {f"{chosen.hook(key)}.hook_sae_acts_post": key for key in chosen}
        stop = None if return_logits else block_of(max(chosen.layers)) + 1
        with torch.no_grad():
            if self._bank is None:
                with self.attached(chosen, preflight=False):    # a call's own splice: attach/FlowTracer/validate check
                    out, cache = self.run_with_cache(
                        tokens, names_filter=list(names), stop_at_layer=stop, **forward_kwargs
                    )
            else:
                out, cache = self.run_with_cache(tokens, names_filter=list(names), stop_at_layer=stop, **forward_kwargs)
        acts = {key: cache[name] for name, key in names.items()}
        return (out if return_logits else None), FeatureCache(acts)

    def feature_acts(self, ref: FeatureRef | str, tokens: Tensor | str | list[str], **kwargs: Any) -> Tensor:
        """``[batch, pos]`` activations of one feature (a shortcut for :meth:`run_with_features`)."""
        ref = FeatureRef.parse(ref)
        _, cache = self.run_with_features(
            tokens, sites=[ref.site], layers=[ref.layer], return_logits=False, **kwargs
        )
        return cache[ref]


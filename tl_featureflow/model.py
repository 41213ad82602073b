"""FlowTransformer: a HookedTransformer with an SAE bank spliced in at every layer.

``attach(bank)`` splices each SAE of the bank in at its site's hook the way
SAELens's ``HookedSAETransformer.add_sae`` does, with an exact error term, so the
model's outputs do not change (bit for bit), while ``blocks.{L}.hook_resid_post.hook_sae_acts_post`` (and the MLP
and attention equivalents) become ordinary TransformerLens hook points: editing a
feature's activation there changes the site's output by exactly
``delta_activation * W_dec[feature]``.

>>> model = FlowTransformer.from_hooked(my_hooked_transformer)   # doctest: +SKIP
>>> with model.attached(bank):                                   # doctest: +SKIP
...     logits, feats = model.run_with_features(tokens)
>>> feats["res", 3].shape   # [batch, pos, d_sae]                # doctest: +SKIP
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE, HookedSAETransformer
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper, set_deep_attr
from sae_lens.saes.sae import SAEMetadata, _disable_hooks
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_featureflow.errors import FeatureFlowError, ModelMismatchError, UnknownFeatureError
from tl_featureflow.refs import FeatureRef, Key, Site, hook_name, sae_hook_name
from tl_featureflow.saes.bank import SAEBank

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


def _set_tensor(root: torch.nn.Module, name: str, value: Tensor, kind: str) -> None:
    module_name, _, leaf = name.rpartition(".")
    getattr(root.get_submodule(module_name), kind)[leaf] = value


def _with_hook_name(sae: SAE, name: str) -> SAE:
    """A shallow view of ``sae`` (same parameters and hook points) whose hook is ``name``.

    Used for SAEs whose metadata names an alias of the site's hook (or none), so that
    the user's SAE object is never modified.
    """
    view = copy.copy(sae)
    cfg = copy.copy(sae.cfg)
    cfg.metadata = SAEMetadata(**{**sae.cfg.metadata.to_dict(), "hook_name": name})
    object.__setattr__(view, "cfg", cfg)
    return view


class _ExactSAEWrapper(_SAEWrapper):
    """SAELens's SAE splice with the error term, written so that it is exact.

    SAELens returns ``sae_out + (x - sae_out_clean)``, which differs from ``x`` by float
    rounding. This wrapper returns ``x + (sae_out - sae_out_clean)``: bit-identical to
    ``x`` when nothing edits the SAE's hooks (then the SAE is not even run), and
    ``x + (delta acts) @ W_dec`` when a hook edits the feature activations. Gradients
    match the unspliced model's too (both reconstructions carry them). Edits at
    ``hook_sae_error`` are added on top.
    """

    def _hooked(self) -> bool:
        points = [*self.sae.hook_dict.values(), self.hook_sae_error, self.hook_sae_output]
        return any(p._forward_hooks or p._forward_pre_hooks or p.bwd_hooks for p in points)

    def forward(self, original_output: Tensor) -> Tensor:
        if self._captured_input is not None or self._token_mask is not None:
            return super().forward(original_output)
        if not self._hooked():
            return original_output
        sae = self.sae
        sae_out = sae.decode(sae.encode(original_output))
        with _disable_hooks(sae):
            clean = sae.decode(sae.encode(original_output))
        error = original_output - clean
        hooked_error = self.hook_sae_error(error)
        out = original_output + (sae_out - clean).to(original_output.dtype)
        if hooked_error is not error:
            out = out + (hooked_error - error)
        return self.hook_sae_output(out)


class FlowTransformer(HookedSAETransformer):
    """A ``HookedSAETransformer`` that carries an :class:`SAEBank` at every layer.

    Build one with :meth:`from_hooked` (wrapping a model you already have, sharing its
    weights), with :func:`tl_featureflow.load_embedded_model`, or like any
    HookedTransformer.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._bank: SAEBank | None = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_hooked(cls, model: HookedTransformer) -> FlowTransformer:
        """Wrap an existing HookedTransformer; parameters and buffers are shared, not copied.

        The new model has its own module tree and hook points (so attaching SAEs to it
        leaves ``model`` untouched) built on the meta device, then pointed at
        ``model``'s tensors. Hooks already on ``model`` are not carried over. A
        FlowTransformer is returned as is.
        """
        if isinstance(model, cls):
            return model
        if not isinstance(model, HookedTransformer):
            raise FeatureFlowError(f"from_hooked needs a transformer_lens.HookedTransformer, got {type(model).__name__}")
        if isinstance(model, HookedSAETransformer) and model.acts_to_saes:
            raise FeatureFlowError(
                f"the model has SAEs attached at {sorted(model.acts_to_saes)}: call model.reset_saes() first"
            )
        cfg = copy.deepcopy(model.cfg)
        tokenizer_name, cfg.tokenizer_name = cfg.tokenizer_name, None  # never reload from a hub
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            new = cls(cfg, tokenizer=None, move_to_device=False)
        new.cfg.tokenizer_name = tokenizer_name
        new.tokenizer = model.tokenizer
        for kind, theirs, ours in (
            ("_parameters", dict(model.named_parameters()), dict(new.named_parameters())),
            ("_buffers", dict(model.named_buffers()), dict(new.named_buffers())),
        ):
            if set(theirs) != set(ours):
                raise FeatureFlowError(
                    f"cannot wrap {type(model).__name__}: its {kind.strip('_')} differ from a "
                    f"HookedTransformer of the same cfg ({sorted(set(theirs) ^ set(ours))[:5]})"
                )
            for name, tensor in theirs.items():
                _set_tensor(new, name, tensor, kind)
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
            raise FeatureFlowError(f"expected an SAEBank, got {type(bank).__name__}")
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
            name = hook_name(site, layer)
            if name not in self.hook_dict and name not in self._acts_to_saes:
                raise ModelMismatchError(f"the model has no hook {name!r} for the SAE at {(site, layer)}")
            block_param = next(self.blocks[layer].parameters())
            if sae.W_dec.device != block_param.device or sae.W_dec.dtype != block_param.dtype:
                raise ModelMismatchError(
                    f"the SAE at {(site, layer)} is {sae.W_dec.dtype} on {sae.W_dec.device} but layer {layer} "
                    f"of the model is {block_param.dtype} on {block_param.device}: use bank.to(device, dtype)"
                )

    def attach(self, bank: SAEBank) -> None:
        """Splice every SAE of ``bank`` in at its site's hook, with the error term on.

        The model's outputs are unchanged (up to float rounding); the SAEs' hooks
        (``<site hook>.hook_sae_acts_post`` etc.) become addressable. Everything is
        checked before anything is changed.

        Raises:
            FeatureFlowError: a bank is attached already (call :meth:`detach`).
            ModelMismatchError: ``d_in`` differs from ``d_model``, a layer exceeds the
                model's, or an SAE's device/dtype differs from its layer's.
        """
        if self._bank is not None:
            raise FeatureFlowError(f"a bank is already attached ({self._bank.describe()}): call detach() first")
        self.check_bank(bank)
        taken = [hook_name(*key) for key in bank if hook_name(*key) in self._acts_to_saes]
        if taken:
            raise FeatureFlowError(f"other SAEs are attached at {taken}: remove them with reset_saes() first")
        added: list[str] = []
        try:
            for key, sae in bank.items():
                name = hook_name(*key)
                view = sae if sae.cfg.metadata.hook_name == name else _with_hook_name(sae, name)
                # What HookedSAETransformer.add_sae does, with the exact wrapper.
                self._acts_to_saes[name] = _ExactSAEWrapper(view, use_error_term=True)
                added.append(name)
                set_deep_attr(self, name, self._acts_to_saes[name])
            self.setup()
        except BaseException:
            if added:
                self.reset_saes(added)
            raise
        self._bank = bank

    def detach(self) -> None:
        """Remove the attached bank's SAEs, restoring the original hook points."""
        if self._bank is None:
            return
        names = [hook_name(*key) for key in self._bank if hook_name(*key) in self._acts_to_saes]
        self._bank = None
        if names:
            self.reset_saes(names)

    @contextmanager
    def attached(self, bank: SAEBank) -> Iterator[FlowTransformer]:
        """``with model.attached(bank): ...`` attaches for the block and always detaches."""
        self.attach(bank)
        try:
            yield self
        finally:
            self.detach()

    # -- running -------------------------------------------------------------------------------
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
            raise FeatureFlowError("another bank is attached: detach() it or call without bank=")
        source = self._bank if self._bank is not None else bank
        if source is None:
            raise FeatureFlowError("no SAE bank: attach(bank) first or pass bank=")
        chosen = source.select(sites=sites, layers=layers)
        names = {sae_hook_name(*key): key for key in chosen}
        stop = None if return_logits else max(chosen.layers) + 1
        with torch.no_grad():
            if self._bank is None:
                with self.attached(chosen):
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


"""The model seam: what the package needs from a model, and its TransformerLens implementation.

The wings reach the model through :class:`ModelBackend` (hook names per site, run with hooks,
run from layer L, tokenize, generate, unembed, the attention's output map), never through ``model.blocks``, ``stop_at_layer=``
or ``model.W_U`` directly (``tests/test_architecture.py`` checks it). :func:`backend_of` wraps a
TransformerLens ``HookedTransformer`` (or :class:`~tl_featureflow.model.FlowTransformer`) in
:class:`TLBackend`, a thin adapter that keeps no copies and never modifies the model; an object
that already is a backend passes through, so another backend (a TransformerLens ``TransformerBridge``,
a recording wrapper in ``tests/test_backend.py``) is one new class.

>>> import torch
>>> from tl_featureflow.synthetic import tiny_model
>>> backend = backend_of(tiny_model(n_layers=2, d_model=16))
>>> backend.n_layers, backend.d_model, backend.hook_point("mlp", 1)
(2, 16, 'blocks.1.hook_mlp_out')
>>> tokens = torch.tensor([[1, 2, 3]])
>>> entering = backend.resid_entering(tokens, 1)        # the stream entering layer 1
>>> torch.equal(backend.run_from_layer(entering, 1), backend.run_with_hooks(tokens, []))
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.refs import Site, hook_name

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["ModelBackend", "TLBackend", "backend_of", "Hooks"]

Hooks = Sequence[tuple[str, Callable[..., Any]]]
"""Forward hooks as TransformerLens takes them: ``[(hook name, fn(tensor, hook) -> tensor | None)]``."""


@runtime_checkable
class ModelBackend(Protocol):
    """What the package needs from a model. Hook names are strings built by :mod:`tl_featureflow.refs`."""

    model: Any   # Any on purpose: whatever model a backend adapts (a HookedTransformer, a TransformerBridge, ...)
    """The wrapped model (for what is not part of the seam, such as an SAE bank's ``bind``)."""

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def d_vocab(self) -> int: ...

    @property
    def n_ctx(self) -> int | None: ...

    @property
    def tokenizer(self) -> Any: ...

    def hook_point(self, site: Site, layer: int) -> str:
        """The hook where an SAE of ``(site, layer)`` reads and writes."""
        ...

    def has_hook(self, name: str) -> bool:
        """Whether the model runs a hook named ``name``."""
        ...

    def hooks(self, fwd_hooks: Hooks) -> AbstractContextManager[Any]:
        """A context in which every forward runs ``fwd_hooks``; they are removed on leaving, even on errors."""
        ...

    def run_with_hooks(self, tokens: Int[Tensor, "batch pos"], fwd_hooks: Hooks, *,
                       stop_at_layer: int | None = None) -> Tensor:
        """One forward with ``fwd_hooks``: the logits, or the residual stream entering ``stop_at_layer``."""
        ...

    def run_with_cache(self, tokens: Int[Tensor, "batch pos"], names: Sequence[str], *,
                       stop_at_layer: int | None = None) -> Mapping[str, Tensor]:
        """The activations at the hooks ``names`` of one forward (stopped before ``stop_at_layer``)."""
        ...

    def resid_entering(self, tokens: Int[Tensor, "batch pos"], layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream entering layer ``layer`` (``blocks.{layer}.hook_resid_pre``)."""
        ...

    def run_from_layer(self, resid: Float[Tensor, "batch pos d_model"], start: int,
                       stop: int | None = None) -> Tensor:
        """Run layers ``start..stop-1`` on ``resid``: the stream entering ``stop``, or the logits if None."""
        ...

    def tokenize(self, text: str | list[str], **kwargs: Any) -> Int[Tensor, "batch pos"]:
        """Token ids of ``text`` (with the model's BOS handling)."""
        ...

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``generate`` (hooks active around it apply to every step)."""
        ...

    def unembed(self, direction: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        """Logits of a ``d_model`` direction through the final norm's weight and the unembedding (logit lens)."""
        ...

    def attention_out(self, layer: int) -> tuple[Float[Tensor, "n_heads d_head d_model"], Float[Tensor, " d_model"],
                                                 Float[Tensor, " d_model"] | None]:
        """``(W_O, b_O, w)`` of layer ``layer``'s attention: what maps ``hook_z`` to ``hook_attn_out``, ``w`` the
        weight of a norm between them (Gemma 2/3's post-attention RMSNorm) or None. The model's own tensors."""
        ...

    def weight_processing(self) -> dict[str, bool]:
        """What the model's weights show of TransformerLens's ``from_pretrained`` processing, by the names of its
        keyword arguments (``fold_ln``, ``center_writing_weights``): only those the weights can tell."""
        ...


class TLBackend:
    """:class:`ModelBackend` over a TransformerLens ``HookedTransformer``: plain pass-throughs, no copies."""

    def __init__(self, model: HookedTransformer):
        self.model = model

    def __repr__(self) -> str:
        return f"TLBackend({type(self.model).__name__}, n_layers={self.n_layers}, d_model={self.d_model})"

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return self.model.cfg.d_vocab

    @property
    def n_ctx(self) -> int | None:
        return getattr(self.model.cfg, "n_ctx", None)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    def hook_point(self, site: Site, layer: int) -> str:
        return hook_name(site, layer)

    def has_hook(self, name: str) -> bool:
        return name in self.model.hook_dict

    def hooks(self, fwd_hooks: Hooks) -> AbstractContextManager[Any]:
        return self.model.hooks(fwd_hooks=list(fwd_hooks))

    def run_with_hooks(self, tokens: Tensor, fwd_hooks: Hooks, *, stop_at_layer: int | None = None) -> Tensor:
        with self.hooks(fwd_hooks):
            return self.model(tokens, stop_at_layer=stop_at_layer)

    def run_with_cache(self, tokens: Tensor, names: Sequence[str], *,
                       stop_at_layer: int | None = None) -> Mapping[str, Tensor]:
        _, cache = self.model.run_with_cache(tokens, names_filter=list(names), stop_at_layer=stop_at_layer)
        return cache

    def resid_entering(self, tokens: Tensor, layer: int) -> Tensor:
        return self.model(tokens, stop_at_layer=layer)

    def run_from_layer(self, resid: Tensor, start: int, stop: int | None = None) -> Tensor:
        return self.model(resid, start_at_layer=start, stop_at_layer=stop)

    def tokenize(self, text: str | list[str], **kwargs: Any) -> Tensor:
        return self.model.to_tokens(text, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def unembed(self, direction: Tensor) -> Tensor:
        W_U = self.model.W_U
        direction = direction.to(W_U.device, W_U.dtype)
        ln_w = getattr(getattr(self.model, "ln_final", None), "w", None)
        return (direction * ln_w if ln_w is not None else direction) @ W_U

    def attention_out(self, layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        block = self.model.blocks[layer]
        return block.attn.W_O, block.attn.b_O, getattr(getattr(block, "ln1_post", None), "w", None)

    def weight_processing(self) -> dict[str, bool]:
        # fold_ln turns the norms into their weightless "Pre" kinds (LNPre, RMSPre); centring writing weights
        # (LayerNorm models only: TransformerLens skips it for the rest) leaves every vector written into the
        # residual stream with mean 0 over d_model: the embedding's rows and layer 0's W_O are enough to tell.
        kind = str(getattr(self.model.cfg, "normalization_type", None) or "")
        if not kind:
            return {}
        shown = {"fold_ln": kind.endswith("Pre")}
        if kind.startswith("LN"):
            W_E, W_O = self.model.W_E.detach(), self.attention_out(0)[0].detach()
            shown["center_writing_weights"] = all(
                bool(w.mean(-1).abs().max() <= 1e-5 * max(float(w.abs().max()), 1e-12) * w.shape[-1] ** 0.5)
                for w in (W_E, W_O))
        return shown


def backend_of(model: HookedTransformer | ModelBackend) -> ModelBackend:
    """``model`` itself if it is a :class:`ModelBackend`, else a :class:`TLBackend` over it."""
    if isinstance(model, ModelBackend):
        return model
    return TLBackend(model)

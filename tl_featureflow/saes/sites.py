"""Where an SAE sits in the model: the hook it reads and edits, and how its space maps to ``d_model``.

Most SAEs read and write the ``d_model`` space of their site (``hook_resid_post``,
``hook_mlp_out``, ``hook_attn_out``). The attention SAEs of Gemma Scope and of GPT-2's
``hook-z`` suites read ``blocks.{L}.attn.hook_z`` instead: the heads' outputs ``z``
``[batch, pos, n_heads, d_head]`` before ``W_O``. Since

    attn_out = z_flat @ W_O_flat + b_O        (W_O_flat: [n_heads * d_head, d_model])

a z-space decoder row ``d`` writes ``d @ W_O_flat`` into the residual stream, exactly. So a
z-SAE serves the ``att`` site: matching uses its mapped rows (:func:`z_write_map`), its
activations come from its own encoder on ``hook_z``, and edits are made on ``hook_z``
(the same edit of ``attn_out`` wherever nothing sits between ``W_O`` and ``hook_attn_out``).
Where a norm does (Gemma 2/3's post-attention RMSNorm), the map includes the norm's weight: a
direction up to the norm's per-token scale, so matching reads directions, and the edit stays
exact in ``z``.

SAELens gives z-SAEs two conventions: ``reshape_activations="hook_z"`` SAEs flatten the heads
themselves (they take ``[..., n_heads, d_head]``), others take the flat ``[..., n_heads * d_head]``
(Gemma Scope 2). :func:`sae_input` feeds either from the hook's tensor.

>>> import torch
>>> from tl_featureflow.synthetic import make_sae
>>> sae = make_sae("att", 0, d_in=4, hook="blocks.0.attn.hook_z")
>>> is_z(sae), sae_input(sae, torch.zeros(2, 5, 2, 2)).shape       # 2 heads of d_head 2, flattened
(True, torch.Size([2, 5, 4]))

Transcoders (SAELens's ``Transcoder``, ``SkipTranscoder``, their JumpReLU kinds) serve the ``mlp``
site: one reads the MLP's input at layer L (``cfg.metadata.hook_name``, one of
:data:`TRANSCODER_INPUTS`) and writes ``blocks.L.hook_mlp_out`` (``cfg.metadata.hook_name_out``).
Its decoder rows are in ``mlp_out`` space already, so matching reads them as they are; its
activations come from its encoder on its input hook, and edits go to ``hook_mlp_out``
(:func:`transcoder_layer` checks both hooks). Every input hook fires before ``hook_mlp_out`` in
the same block, so an edit at the output can use activations read at the input in the same forward.
A skip transcoder's ``W_skip`` path is linear in the input and carries no feature: it counts with
the reconstruction error. Cross-layer transcoders are refused: their features write several layers.

>>> tc = make_sae("mlp", 2, hook="blocks.2.ln2.hook_normalized")
>>> tc.cfg.metadata.hook_name_out = "blocks.2.hook_mlp_out"
>>> is_transcoder(tc), transcoder_layer(tc, "tc")
(True, 2)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_featureflow.backend import backend_of
from tl_featureflow.errors import ModelMismatchError, TranscoderError
from tl_featureflow.refs import Key, hook_name, site_of_hook

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Z_SUFFIX", "z_hook_name", "layer_of_z_hook", "key_of_sae_hook", "is_z", "sae_input", "z_write_map",
           "z_map_tensors", "TRANSCODER_INPUTS", "is_transcoder", "transcoder_layer", "transcoder_read_hook",
           "check_transcoder_config", "check_transcoder_hooks"]

Z_SUFFIX = "attn.hook_z"
_Z_RE = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


def z_hook_name(layer: int) -> str:
    """``blocks.{layer}.attn.hook_z``: where a z-space attention SAE reads and edits."""
    return f"blocks.{layer}.{Z_SUFFIX}"


def layer_of_z_hook(name: str | None) -> int | None:
    """The layer of a ``blocks.L.attn.hook_z`` name, or None for any other name."""
    match = _Z_RE.match(name or "")
    return int(match.group(1)) if match else None


def key_of_sae_hook(name: str | None, out: str | None = None) -> Key | None:
    """The bank key of an SAE that reads hook ``name`` (and writes ``out``): its site's
    (:func:`~tl_featureflow.refs.site_of_hook`), ``("att", L)`` for ``blocks.L.attn.hook_z``,
    ``("mlp", L)`` for a transcoder writing ``blocks.L.hook_mlp_out``, or None."""
    if out is not None and out != name:
        found = site_of_hook(out)
        return found if found is not None and found[0] == "mlp" else None
    found = site_of_hook(name) if name else None
    layer = layer_of_z_hook(name)
    return ("att", layer) if found is None and layer is not None else found


#: Where a transcoder of layer L may read the MLP's input: ``blocks.L.<one of these>``. All fire before
#: ``blocks.L.hook_mlp_out`` (``hook_mlp_in`` only when ``cfg.use_hook_mlp_in``; ``mlp.hook_in`` is the
#: hook SAELens's ``HookedSAETransformer`` adds to every MLP).
TRANSCODER_INPUTS: tuple[str, ...] = ("ln2.hook_normalized", "hook_resid_mid", "hook_mlp_in", "mlp.hook_in")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _layer_of(name: str | None) -> int | None:
    match = _BLOCK_RE.match(name or "")
    return int(match.group(1)) if match else None


def is_transcoder(sae: Any) -> bool:
    """Whether ``sae`` writes another hook than it reads (``cfg.metadata.hook_name_out``): a transcoder."""
    meta = sae.cfg.metadata
    return meta.hook_name_out is not None and meta.hook_name_out != meta.hook_name


def transcoder_read_hook(cfg: Any) -> str:
    """The TransformerLens hook whose tensor a transcoder's encoder was trained on (from its ``cfg``).

    Its ``cfg.metadata.hook_name``, except where SAELens names a hook whose tensor is not the one the
    SAE read: Gemma Scope 2's transcoders (SAELens's ``gemma_3`` loader) say ``blocks.L.hook_mlp_in``
    (TransformerLens's residual stream before ``ln2``) but were trained on HF's
    ``model.layers.L.pre_feedforward_layernorm.output`` (their ``hf_hook_name``): the MLP's normalised
    input, ``blocks.L.ln2.hook_normalized`` (that of an unfolded model: ``fold_ln=False`` keeps the
    norm's weight in it). Read at ``hook_mlp_in`` they would see the un-normalised stream.

    >>> from tl_featureflow.synthetic import make_sae
    >>> tc = make_sae("mlp", 3, hook="blocks.3.hook_mlp_in")
    >>> tc.cfg.metadata.hook_name_out = "blocks.3.hook_mlp_out"
    >>> tc.cfg.metadata.hf_hook_name = "model.layers.3.pre_feedforward_layernorm.output"
    >>> transcoder_read_hook(tc.cfg)
    'blocks.3.ln2.hook_normalized'
    """
    meta = cfg.metadata
    layer = _layer_of(meta.hook_name)
    if layer is not None and meta.hook_name == f"blocks.{layer}.hook_mlp_in" \
            and meta.hf_hook_name == f"model.layers.{layer}.pre_feedforward_layernorm.output":
        return f"blocks.{layer}.ln2.hook_normalized"
    return meta.hook_name


def transcoder_layer(sae: Any, what: str) -> int:
    """The layer L of a single-layer MLP transcoder: it reads ``blocks.L.<TRANSCODER_INPUTS>`` and writes
    ``blocks.L.hook_mlp_out`` with one ``[d_sae, d_model]`` decoder of ``d_out == d_in``.

    Raises:
        TranscoderError: naming ``what`` (the SAE) and what was expected, for a cross-layer or
            multi-layer transcoder, hooks we do not serve, or an output width unlike its input's.
    """
    meta, cfg = sae.cfg.metadata, sae.cfg
    W_dec = getattr(sae, "W_dec", None)
    return check_transcoder_config(meta.hook_name, meta.hook_name_out, what, d_in=cfg.d_in,
                                   d_out=getattr(cfg, "d_out", cfg.d_in),
                                   decoder_shape=tuple(W_dec.shape) if W_dec is not None else None,
                                   hooks_out=getattr(meta, "hook_names_out", None))


def check_transcoder_config(name: str | None, out: str | None, what: str, *, d_in: int | None = None,
                            d_out: int | None = None, decoder_shape: tuple[int, ...] | None = None,
                            hooks_out: Any = None) -> int:
    """:func:`transcoder_layer` from config facts alone (SAELens config dicts are read before any weights)."""
    layer, out_layer = _layer_of(name), _layer_of(out)
    several = bool(hooks_out) or (decoder_shape is not None and len(decoder_shape) != 2)
    if several or (layer is not None and out_layer is not None and layer != out_layer):
        shape = f" (decoder of shape {decoder_shape})" if decoder_shape is not None and len(decoder_shape) != 2 else ""
        raise TranscoderError(
            f"transcoder {what} reads {name!r} and writes {out!r}{shape}: a cross-layer transcoder, whose "
            "features write several layers; an SAEBank serves single-layer transcoders only (one layer's MLP "
            "input to the same layer's hook_mlp_out)")
    if layer is None or name not in [f"blocks.{layer}.{suffix}" for suffix in TRANSCODER_INPUTS] \
            or out != hook_name("mlp", layer):
        raise TranscoderError(
            f"transcoder {what} reads {name!r} and writes {out!r}: an SAEBank serves transcoders at the mlp site "
            f"only, reading blocks.L.{{{', '.join(TRANSCODER_INPUTS)}}} and writing blocks.L.hook_mlp_out")
    if d_in is not None and d_out is not None and d_out != d_in:
        raise TranscoderError(f"transcoder {what} maps d_in {d_in} to d_out {d_out}: expected a transcoder from "
                              "the MLP's input to its output, both d_model wide")
    return layer


def check_transcoder_hooks(model: HookedTransformer, key: Key, read: str) -> None:
    """Raise ModelMismatchError unless ``model`` has (and fires) the input hook ``read`` of the transcoder at
    ``key``: ``hook_mlp_in`` fires only with ``cfg.use_hook_mlp_in``; ``mlp.hook_in`` is SAELens's."""
    if read.endswith(".hook_mlp_in") and not getattr(model.cfg, "use_hook_mlp_in", False):
        raise ModelMismatchError(f"the transcoder at {key} reads {read!r}, which this model only runs with "
                                 "model.set_use_hook_mlp_in(True)")
    if read not in model.hook_dict:
        extra = " (a hook of SAELens's HookedSAETransformer: wrap the model with FlowTransformer.from_hooked)" \
            if read.endswith("mlp.hook_in") else ""
        raise ModelMismatchError(f"the model has no hook {read!r} for the transcoder at {key}{extra}")


def is_z(sae: Any) -> bool:
    """Whether ``sae`` reads ``attn.hook_z`` (by its ``cfg.metadata.hook_name``)."""
    return layer_of_z_hook(sae.cfg.metadata.hook_name) is not None


def sae_input(sae: Any, x: Tensor) -> Tensor:
    """What ``sae.encode`` takes, from the tensor of the SAE's own hook.

    A z-SAE that does not reshape itself gets the heads flattened (``[..., n_heads, d_head]``
    to ``[..., n_heads * d_head]``); every other SAE gets ``x`` as it is.
    """
    if is_z(sae) and not getattr(sae, "hook_z_reshaping_mode", False) and x.shape[-1] != sae.cfg.d_in:
        return x.flatten(-2)
    return x


def z_map_tensors(model: HookedTransformer, layer: int, *, stamp: Any = None) -> tuple[Any, ...]:
    """The model tensors :func:`z_write_map` reads at ``layer`` (``W_O``, ``b_O``, a post-attention norm's
    weight), each passed through ``stamp`` when given (for caches that must see their edits)."""
    W_O, b_O, weight = backend_of(model).attention_out(layer)
    tensors = [W_O, b_O] if weight is None else [W_O, b_O, weight]
    return tuple(stamp(t) if stamp is not None else t for t in tensors)


def z_write_map(
    model: HookedTransformer, layer: int, *, device: torch.device | str | None = None
) -> tuple[Float[Tensor, "n_heads_d_head d_model"], Float[Tensor, " d_model"]]:
    """``(W, b)`` with ``attn_out = z_flat @ W + b`` at ``layer``: ``W_O`` flattened, and ``b_O``.

    With a post-attention norm (TransformerLens's ``ln1_post``, Gemma 2/3), the norm's weight
    multiplies both: ``attn_out`` is then ``(z_flat @ W + b)`` up to the norm's per-token scale.
    Read from the model at each call (no copy kept), so edits of ``W_O`` are seen.
    """
    W_O, b_O, *norm = (t.detach() for t in z_map_tensors(model, layer))      # W_O: [n_heads, d_head, d_model]
    W, b = W_O.reshape(-1, W_O.shape[-1]), b_O
    if norm:
        W, b = W * norm[0], b * norm[0]
    if W.shape[0] != model.cfg.n_heads * model.cfg.d_head:
        raise ModelMismatchError(f"layer {layer}'s W_O has {W.shape[0]} rows, not n_heads * d_head")
    return W.to(device or W.device), b.to(device or b.device)

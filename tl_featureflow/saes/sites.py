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
"""

from __future__ import annotations

import re
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_featureflow.errors import ModelMismatchError
from tl_featureflow.refs import Key, site_of_hook

__all__ = ["Z_SUFFIX", "z_hook_name", "layer_of_z_hook", "key_of_sae_hook", "is_z", "sae_input", "z_write_map",
           "z_map_tensors"]

Z_SUFFIX = "attn.hook_z"
_Z_RE = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


def z_hook_name(layer: int) -> str:
    """``blocks.{layer}.attn.hook_z``: where a z-space attention SAE reads and edits."""
    return f"blocks.{layer}.{Z_SUFFIX}"


def layer_of_z_hook(name: str | None) -> int | None:
    """The layer of a ``blocks.L.attn.hook_z`` name, or None for any other name."""
    match = _Z_RE.match(name or "")
    return int(match.group(1)) if match else None


def key_of_sae_hook(name: str | None) -> Key | None:
    """The bank key of an SAE that reads hook ``name``: its site's (:func:`~tl_featureflow.refs.site_of_hook`),
    ``("att", L)`` for ``blocks.L.attn.hook_z``, or None."""
    found = site_of_hook(name) if name else None
    layer = layer_of_z_hook(name)
    return ("att", layer) if found is None and layer is not None else found


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


def z_map_tensors(model: Any, layer: int, *, stamp: Any = None) -> tuple[Any, ...]:
    """The model tensors :func:`z_write_map` reads at ``layer`` (``W_O``, ``b_O``, a post-attention norm's
    weight), each passed through ``stamp`` when given (for caches that must see their edits)."""
    block = model.blocks[layer]
    tensors = [block.attn.W_O, block.attn.b_O]
    weight = getattr(getattr(block, "ln1_post", None), "w", None)
    if weight is not None:
        tensors.append(weight)
    return tuple(stamp(t) if stamp is not None else t for t in tensors)


def z_write_map(
    model: Any, layer: int, *, device: torch.device | str | None = None
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

"""Feature arithmetic on one SAE: unit decoder directions and the rescale edit.

The one home of two formulas that matching, validation and steering all use:

- a feature's direction is its decoder row scaled to unit norm (:func:`unit_rows`);
- rescaling features by ``r`` adds ``(r - 1) * a * v`` to the activation ``h`` they are
  read from, ``a`` from the SAE's own encoder and ``v`` the raw decoder row, so that
  ``a * v`` is exactly the feature's part of the reconstruction (:func:`rescale_delta`).

>>> import torch
>>> unit_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
tensor([[0.6000, 0.8000],
        [0.0000, 0.0000]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["unit_rows", "rescale_delta"]


def unit_rows(x: Float[Tensor, "n d"], eps: float = 1e-12) -> Float[Tensor, "n d"]:
    """Rows scaled to unit L2 norm, computed in float32 (zero rows stay zero)."""
    x32 = x.float()
    return x32 / x32.norm(dim=-1, keepdim=True).clamp_min(eps)


def rescale_delta(
    h: Float[Tensor, "*batch d_in"],
    sae: Any,
    features: Sequence[int] | Tensor,
    factors: Float[Tensor, "*batch n_feat"] | float,
    W: Float[Tensor, "n_feat d_model"] | None = None,
    x: Tensor | None = None,
) -> Float[Tensor, "*batch d_in"]:
    """``sum_f factors[..., f] * a_f(h) * v_f`` in float32: with ``factors = r - 1``, the rescale edit.

    ``a_f(h)`` is feature ``f``'s activation read by ``sae``'s own encoder (no gradient),
    ``v_f`` its raw decoder row (pass ``W = W_dec[features]`` to reuse a gathered copy).
    ``factors`` broadcasts against ``[*batch, n_feat]``. For a z-SAE ``h`` is its hook's tensor
    ``[*batch, n_heads, d_head]`` and so is the result. For a transcoder ``h`` is its output
    (``hook_mlp_out``) and ``x`` the encoder's input from the same forward (its input hook, same positions):
    the activations are read from ``x``, the edit is made on ``h``.
    """
    from tl_featureflow.saes.sites import sae_input

    index = torch.as_tensor(features, device=h.device, dtype=torch.long)
    with torch.no_grad():
        source = h if x is None else x
        acts = sae.encode(sae_input(sae, source.to(sae.W_dec.dtype)))[..., index].float()   # [*batch, n_feat]
    if W is None:
        W = sae.W_dec.detach()[index.to(sae.W_dec.device)]
    return ((acts * factors) @ W.to(h.device, torch.float32)).reshape(h.shape)   # hook_z: back to heads

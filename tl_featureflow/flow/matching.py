"""Pure tensor maths of data-free matching: chunked top-k cosine, permutations, folding.

No hooks and no models here. Decoder directions come in as rows (``[n, d_model]``,
SAELens's ``W_dec`` layout).

>>> import torch
>>> A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])          # decoder rows of SAE A
>>> B = torch.tensor([[0.0, 2.0], [3.0, 4.0]])          # decoder rows of SAE B
>>> scores, indices = topk_cosine(B, A, k=1, normalize=True)
>>> indices.flatten().tolist(), scores.flatten().tolist()   # for every row of B, its best row of A
([1, 1], [1.0, 0.800000011920929])

Memory stays O(chunk x n_src) whatever the widths: the full ``n_dst x n_src``
similarity matrix is never built. Inputs of any float dtype are multiplied in
float32. Ties are broken deterministically: the lowest index wins.
"""

from __future__ import annotations

import copy

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.checks import check_int
from tl_featureflow.errors import BankError, InvalidArgumentError
from tl_featureflow.saes.features import unit_rows

__all__ = [
    "unit_rows",
    "topk_cosine",
    "default_chunk_size",
    "permutation_match",
    "fold_jumprelu_threshold",
    "MAX_PERMUTATION_WIDTH",
]

MAX_PERMUTATION_WIDTH = 8192
_CHUNK_ELEMENTS = 1 << 25  # 32M fp32 similarities (128 MB) per chunk


def default_chunk_size(n_src: int) -> int:
    """Rows of ``dst`` per chunk so that one chunk's similarities take about 128 MB."""
    return max(1, min(4096, _CHUNK_ELEMENTS // max(1, n_src)))


def _check_pair(dst: Tensor, src: Tensor, k: int) -> None:
    if dst.ndim != 2 or src.ndim != 2:
        raise InvalidArgumentError(f"expected 2-D [n, d_model] decoders, got shapes {tuple(dst.shape)} and {tuple(src.shape)}")
    if dst.shape[1] != src.shape[1]:
        raise InvalidArgumentError(
            f"decoders live in different spaces: d_model {dst.shape[1]} vs {src.shape[1]} "
            f"(shapes {tuple(dst.shape)} and {tuple(src.shape)})"
        )
    check_int(k, "k", low=1, high=src.shape[0], context=" (the source width is the most)")


def _stable_topk(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk`` along dim 1 with ties broken towards the lowest index.

    topk's own tie order is unspecified. Taking k+1 values shows every tie that could
    matter: two equal neighbours among them (inside the top k, or the k-th equal to the
    first one left out). Such rows, rare with float data, are redone with a stable sort.
    """
    n = sims.shape[1]
    values, indices = sims.topk(min(k + 1, n), dim=1)
    suspicious = (values[:, 1:] == values[:, :-1]).any(dim=1)
    values, indices = values[:, :k], indices[:, :k]
    if bool(suspicious.any()):
        rows = suspicious.nonzero().squeeze(1)
        sorted_values, sorted_indices = torch.sort(sims[rows], dim=1, descending=True, stable=True)
        values[rows] = sorted_values[:, :k]
        indices[rows] = sorted_indices[:, :k]
    return values, indices


@torch.no_grad()
def topk_cosine(
    dst: Float[Tensor, "n_dst d_model"],
    src: Float[Tensor, "n_src d_model"],
    k: int = 1,
    *,
    normalize: bool = False,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Float[Tensor, "n_dst k"], Int[Tensor, "n_dst k"]]:
    """For every row of ``dst``, the ``k`` rows of ``src`` with the highest dot product.

    With unit rows (or ``normalize=True``) that is the cosine similarity of the
    method: ``j* = argmax_j dst[i] . src[j]``.

    Args:
        dst, src: row vectors in the same space; any float dtype, any device.
        k: matches per ``dst`` row, best first.
        normalize: scale rows to unit norm first (results then ignore row norms).
        chunk_size: ``dst`` rows per chunk (default: about 128 MB of similarities).
        device: where to compute (default: ``dst``'s device); results come back there.

    Returns:
        ``(scores, indices)``: float32 ``[n_dst, k]`` and int64 ``[n_dst, k]``.
    """
    _check_pair(dst, src, k)
    device = torch.device(device) if device is not None else dst.device
    src32 = unit_rows(src.to(device)) if normalize else src.to(device=device, dtype=torch.float32)
    src_t = src32.T.contiguous() if src32.device.type == "cpu" else src32.T
    chunk = chunk_size or default_chunk_size(src.shape[0])
    n_dst = dst.shape[0]
    scores = torch.empty(n_dst, k, dtype=torch.float32, device=device)
    indices = torch.empty(n_dst, k, dtype=torch.int64, device=device)
    for start in range(0, n_dst, chunk):
        block = dst[start : start + chunk].to(device)
        block32 = unit_rows(block) if normalize else block.float()
        values, idx = _stable_topk(block32 @ src_t, k)
        scores[start : start + chunk] = values
        indices[start : start + chunk] = idx
    return scores, indices


@torch.no_grad()
def permutation_match(
    dst: Float[Tensor, "n_dst d_model"],
    src: Float[Tensor, "n_src d_model"],
    *,
    normalize: bool = False,
    max_width: int = MAX_PERMUTATION_WIDTH,
) -> tuple[Float[Tensor, " n_dst"], Int[Tensor, " n_dst"]]:
    """SAE Match's baseline: the one-to-one assignment maximising total similarity.

    Solves ``argmax_P <P, dst src^T>`` with ``scipy.optimize.linear_sum_assignment``
    on the dense similarity matrix, so it is limited to widths up to ``max_width``
    (the matrix and the O(n^3) solver grow fast). When ``n_dst > n_src`` some rows get
    no partner: their index is -1 and their score NaN.

    Returns:
        ``(scores, indices)`` of shape ``[n_dst]`` on the CPU.
    """
    from scipy.optimize import linear_sum_assignment

    _check_pair(dst, src, 1)
    if max(dst.shape[0], src.shape[0]) > max_width:
        raise InvalidArgumentError(
            f"permutation matching needs a dense {dst.shape[0]} x {src.shape[0]} matrix and an O(n^3) solver: "
            f"widths above max_width={max_width} are refused (use topk_cosine, or raise max_width)"
        )
    a = unit_rows(dst) if normalize else dst.float()
    b = unit_rows(src) if normalize else src.float()
    sims = (a.cpu() @ b.cpu().T).double().numpy()
    rows, cols = linear_sum_assignment(sims, maximize=True)
    indices = torch.full((dst.shape[0],), -1, dtype=torch.int64)
    scores = torch.full((dst.shape[0],), float("nan"), dtype=torch.float32)
    indices[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    scores[torch.from_numpy(rows)] = torch.from_numpy(sims[rows, cols]).float()
    return scores, indices


@torch.no_grad()
def fold_jumprelu_threshold(sae, *, check: bool = True, atol: float = 1e-4):  # type: ignore[no-untyped-def]
    """A copy of a JumpReLU SAE with its thresholds folded into the weights (method section 7).

    ``W_enc' = W_enc diag(1/theta)``, ``b_enc' = b_enc / theta``, ``W_dec' = diag(theta) W_dec``,
    ``theta' = 1``: the SAE's output is unchanged, while every feature's activation is
    now in units of its own threshold, so one steering coefficient fits features of
    different typical magnitudes. The input SAE is not modified.

    With ``check=True`` the folded SAE's output is compared with the original's on
    random inputs, and a mismatch raises FeatureFlowError.
    """
    from sae_lens import JumpReLUSAE

    if not isinstance(sae, JumpReLUSAE):
        raise InvalidArgumentError(f"folding needs a JumpReLU SAE (with thresholds), got {type(sae).__name__}")
    theta = sae.threshold.detach()
    if not bool((theta > 0).all()):
        raise InvalidArgumentError(
            f"cannot fold: {int((theta <= 0).sum())} thresholds are <= 0 (expected all > 0)"
        )
    folded = copy.deepcopy(sae)
    folded.W_enc.div_(theta)
    folded.b_enc.div_(theta)
    folded.W_dec.mul_(theta.unsqueeze(1))
    folded.threshold.fill_(1.0)
    if check:
        # Probe with inputs built from the SAE's own decoder so that features do fire.
        gen = torch.Generator(device="cpu").manual_seed(0)
        acts = torch.rand(64, sae.cfg.d_sae, generator=gen) * (torch.rand(64, sae.cfg.d_sae, generator=gen) < 0.05)
        acts = acts.to(theta.device, theta.dtype) * theta * 4
        probe = (acts @ sae.W_dec.detach() + sae.b_dec.detach()).to(sae.W_enc.dtype)
        before, after = sae(probe), folded(probe)
        err = (before - after).abs().max().item() / before.abs().max().clamp_min(1e-12).item()
        if err > atol:
            raise BankError(f"folding changed the SAE's output (relative error {err:.2e} > {atol})")
    return folded

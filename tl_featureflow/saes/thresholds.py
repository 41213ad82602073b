"""Per-feature JumpReLU thresholds, calibrated after BatchTopK training.

SAELens converts a BatchTopK SAE to JumpReLU with **one** threshold for every feature
(its running estimate of the batch-wide k-th activation). That threshold is the same
number for all features, so folding it into the weights, "threshold" steering units and
"fell below its own threshold" all degenerate to one constant per SAE.

Matching each feature's firing rate to what BatchTopK gave it does not help: BatchTopK
keeps a feature exactly when its pre-activation clears the batch-wide cutoff, so every
feature's rate-matched threshold is that same cutoff again. We choose each feature's
threshold for what a threshold is for, the trade between reconstruction and sparsity:

    theta_i = argmin_theta  sum_t [ (a_ti^2 |d_i|^2 - 2 a_ti g_ti) + lambda ] * [a_ti > theta]

where ``a_ti`` is feature ``i``'s pre-activation on token ``t``, ``d_i`` its decoder row and
``g_ti = (x_t - x_hat_t) . d_i + c_ti |d_i|^2`` the reconstruction residual with feature
``i``'s own current contribution ``c_ti`` put back: ``a^2 |d|^2 - 2 a g`` is exactly how
much the squared error changes when feature ``i`` fires with ``a`` and the other features
keep their current activations. Each feature's cut is one scan over its sorted
pre-activations (a prefix sum); one ``lambda`` for the whole SAE is found by bisection so
that the mean L0 equals the BatchTopK SAE's on the same tokens. Features whose small
activations point the wrong way (an encoder that overshoots) get high thresholds; features
whose every firing helps get low ones. Because all features move at once, features sharing
a direction would over- or under-shoot together: the cuts are iterated with damping and
the round with the lowest squared error is kept (:func:`calibrate_thresholds`).

>>> import torch
>>> pre = torch.tensor([[3.0, 1.0], [2.0, 4.0], [0.5, 2.5], [-1.0, 0.2]])   # [tokens, features]
>>> delta = torch.tensor([[-5.0, 1.0], [-3.0, -9.0], [2.0, -4.0], [0.0, 3.0]])
>>> cut_thresholds(pre, delta, lam=1.0)      # each fires on its top two tokens
tensor([1.2500, 1.7500])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.checks import check_int
from tl_featureflow.errors import InvalidArgumentError, TranscoderError
from tl_featureflow.refs import block_of

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_featureflow.saes.bank import SAEBank

__all__ = ["cut_thresholds", "squared_error_change", "ThresholdCalibration", "calibrate_thresholds",
           "calibrate_bank", "THRESHOLD_FLOOR"]

#: Thresholds never go below this (a JumpReLU threshold must be > 0 to be folded).
THRESHOLD_FLOOR = 1e-4


def squared_error_change(
    pre: Float[Tensor, "n d_sae"], residual_dot: Float[Tensor, "n d_sae"], dec_norm_sq: Float[Tensor, " d_sae"]
) -> Float[Tensor, "n d_sae"]:
    """How much ``|x - x_hat|^2`` changes if each feature fires at its (ReLU'd) pre-activation: ``a^2|d|^2 - 2ag``.

    >>> squared_error_change(torch.tensor([[2.0]]), torch.tensor([[3.0]]), torch.tensor([1.0]))
    tensor([[-8.]])
    """
    acts = pre.clamp(min=0)
    return acts * (acts * dec_norm_sq - 2 * residual_dot)


def cut_thresholds(
    pre: Float[Tensor, "n d_sae"], delta: Float[Tensor, "n d_sae"], lam: float, *, floor: float = THRESHOLD_FLOOR
) -> Float[Tensor, " d_sae"]:
    """Per feature, the threshold minimising ``sum over fired tokens of (delta + lam)``.

    A feature fires on the tokens whose ``pre`` exceeds its threshold, so each choice is a
    prefix of its tokens sorted by ``pre``; the best prefix ends where the running sum of
    ``delta + lam`` is lowest, and the threshold lies midway between the last value kept
    and the first left out (or 0 when every positive value is kept; never below ``floor``).
    """
    if pre.shape != delta.shape or pre.ndim != 2:
        raise InvalidArgumentError(f"pre and delta must both be [n, d_sae], got {tuple(pre.shape)} and {tuple(delta.shape)}")
    cuts = _Cuts(pre, pre.shape[0])
    cuts.set_delta(delta)
    return cuts.thresholds(lam, floor=floor)[0]


class _Cuts:
    """Each feature's positive pre-activations, largest first, laid end to end; running sums of ``delta`` over them.

    Only positive pre-activations can fire (a threshold is > 0), and on SmolLM2's SAEs they
    are 3-8% of all (token, feature) pairs, so the cuts work on those entries alone: one
    flat array ordered by feature, then by value, with each feature's segment at
    ``starts[f]:starts[f] + counts[f]``.
    """

    def __init__(self, pre: Tensor, max_rows: int, min_fired: Tensor | None = None):
        self.n_tokens, d_sae = pre.shape
        token, feature = (pre > 0).nonzero(as_tuple=True)
        values = pre[token, feature]
        order = torch.argsort(values, descending=True, stable=True)
        order = order[torch.argsort(feature[order], stable=True)]
        token, feature, values = token[order], feature[order], values[order]
        self.all_feature, self.all_values = feature, values         # every positive entry (the L0 counts)
        rank = torch.arange(1, len(feature) + 1, device=pre.device) - self._segments(feature, d_sae)[1][feature]
        if max_rows < self.n_tokens:                                # each feature's max_rows largest
            kept = rank <= max_rows
            token, feature, values, rank = token[kept], feature[kept], values[kept], rank[kept]
        self.token, self.feature, self.values, self.rank = token, feature, values, rank
        self.counts, self.starts = self._segments(feature, d_sae)
        self.padded = torch.cat([values, values.new_zeros(1)])     # index len(values) reads 0 ("none left out")
        self.min_fired = None if min_fired is None else torch.minimum(min_fired, self.counts)
        self.d_sae = d_sae

    @staticmethod
    def _segments(feature: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
        """Per feature: how many entries it has and where its segment starts (``feature`` sorted)."""
        counts = torch.bincount(feature, minlength=d_sae)
        return counts, torch.cumsum(counts, 0) - counts

    def set_delta(self, delta: Tensor) -> None:
        """``delta``: ``[n, d_sae]``, or its values at the entries (``[len(self.values)]``)."""
        values = delta[self.token, self.feature] if delta.ndim == 2 else delta
        # summed in float64 (thousands of terms) over all entries, then made per feature by subtracting the sum
        # before each feature's segment; kept in the working dtype
        total = torch.cumsum(values.double(), dim=0)
        before = torch.cat([total.new_zeros(1), total])[self.starts]
        self.cum_delta = (total - before[self.feature]).to(values.dtype)

    def thresholds(self, lam: float, *, floor: float = THRESHOLD_FLOOR) -> tuple[Tensor, Tensor]:
        """Per feature: the threshold at ``lam`` and how many of the tokens fire."""
        gains = self.cum_delta + self.rank.to(self.cum_delta.dtype) * lam
        best = gains.new_full((self.d_sae,), math.inf).scatter_reduce(0, self.feature, gains, "amin")
        at_best = gains == best[self.feature]
        first = self.rank.new_full((self.d_sae,), self.n_tokens + 1).scatter_reduce(
            0, self.feature[at_best], self.rank[at_best], "amin")
        n_fired = torch.where(best < 0, first, torch.zeros_like(first))            # firing on nothing costs 0
        if self.min_fired is not None:
            n_fired = torch.maximum(n_fired, self.min_fired)
        end = len(self.values)
        left_out = torch.where(n_fired < self.counts, self.padded[(self.starts + n_fired).clamp(max=end)], 0.0)
        last_fired = self.padded[(self.starts + n_fired - 1).clamp(min=0, max=end)]
        top = self.padded[self.starts.clamp(max=end)]
        # midway between the last value kept and the first left out (no token sits on it); above the top when none
        # fires (a feature with no positive value gets the floor)
        none = torch.where(self.counts > 0, torch.nextafter(top, torch.tensor(math.inf, dtype=top.dtype)), 0.0)
        theta = torch.where(n_fired > 0, (left_out + last_fired) / 2, none)
        return theta.clamp(min=floor), n_fired

    def totals(self) -> Tensor:
        """Per feature: ``delta`` summed over all its entries (0 for a feature with none)."""
        last = (self.starts + self.counts - 1).clamp(min=0, max=max(len(self.values) - 1, 0))
        return torch.where(self.counts > 0, self.cum_delta[last] if len(self.values) else 0.0, 0.0)

    def at_l0(self, target: float, scale: float, iterations: int) -> tuple[Tensor, float]:
        """Thresholds whose mean L0 over the tokens is ``target`` (bisection on log lambda) and that lambda."""
        last: list[Tensor] = []

        def l0_at(log_lam: float) -> float:
            theta, n_fired = self.thresholds(scale * 10 ** log_lam)
            last[:] = [theta]
            return float(n_fired.sum()) / self.n_tokens

        log_lam = _bisect_log10(l0_at, target, -12.0, 12.0, iterations)   # log10(lambda / scale)
        return last[0], scale * 10 ** log_lam


def _bisect_log10(l0_at: Callable[[float], float], target: float, low: float, high: float, iterations: int) -> float:
    """Where the decreasing ``l0_at`` meets ``target`` (within 0.1%), by bisection on ``[low, high]``."""
    for _ in range(iterations):
        mid = (low + high) / 2
        l0 = l0_at(mid)
        if abs(l0 - target) <= 1e-3 * target:
            break
        low, high = (mid, high) if l0 > target else (low, mid)
    return mid


def _scaled_to_l0(cuts: _Cuts, theta: Tensor, target: float, iterations: int = 40) -> Tensor:
    """``theta`` times the one factor that makes the mean L0 over the cuts' tokens equal ``target``."""
    ratio = cuts.all_values / theta[cuts.all_feature]           # fires at factor m where ratio > m
    log_factor = _bisect_log10(lambda m: float((ratio > 10 ** m).sum()) / cuts.n_tokens, target, -3.0, 3.0,
                               iterations)
    return theta * 10 ** log_factor


def _entry_delta(cuts: _Cuts, residual_dec: Tensor, acts: Tensor, dec_norm_sq: Tensor) -> Tensor:
    """:func:`squared_error_change` at the cuts' entries only (``residual_dec``: the residual times ``W_dec.T``)."""
    token, feature = cuts.token, cuts.feature
    norm_sq = dec_norm_sq[feature]
    return squared_error_change(cuts.values, residual_dec[token, feature] + acts[token, feature] * norm_sq, norm_sq)


@dataclass(frozen=True)
class ThresholdCalibration:
    """What calibrating one SAE did, measured on its calibration tokens (``rounds``: MSE after each round)."""

    n_tokens: int
    lam: float
    l0_before: float
    l0_after: float
    mse_before: float
    mse_after: float
    threshold_before: float
    threshold_quantiles: tuple[float, float, float]   # 5th, 50th, 95th percentile of the new thresholds
    dead_before: float                                # share of features that fire on no calibration token
    dead_after: float
    rounds: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_thresholds(
    sae: Any,
    activations: Float[Tensor, "n d_in"],
    *,
    target_l0: float | None = None,
    rounds: int = 4,
    damping: float = 0.5,
    keep: float = 0.5,
    max_rows: int | None = None,
    device: torch.device | str | None = None,
    iterations: int = 40,
) -> tuple[Any, ThresholdCalibration]:
    """A copy of a JumpReLU SAE with one threshold per feature (see the module docs).

    Every feature's cut assumes the others keep their activations; when all move at once,
    features that share a direction over- or under-shoot together. So the cuts are
    iterated: each round recomputes the residual with the current thresholds, cuts again
    and moves each threshold ``damping`` of the way (in log space) towards its cut, then
    rescales all thresholds by one factor to hold the target L0. The round with the lowest
    squared error is kept.

    Args:
        sae: a SAELens ``JumpReLUSAE`` (the BatchTopK conversion); never modified.
        activations: ``[n, d_in]`` calibration activations at the SAE's hook.
        target_l0: the mean L0 to keep (default: the SAE's own L0 on ``activations``).
        rounds: cut-and-move rounds; damping: how far each round moves (1: all the way).
        keep: every feature keeps firing on at least this share of the calibration tokens
            it fired on before (0: features that never pay are switched off; on SmolLM2
            that made 30-57% of a well-trained bank's features dead).
        max_rows: each feature's cut looks at its ``max_rows`` largest pre-activations
            (default: all; a feature firing on more tokens than that is capped there, which
            on SmolLM2's att 15 cost 0.02 of explained variance at 4,096 of 16,384).
        device: where to compute (default: the SAE's device).
        iterations: bisection steps for lambda and for the L0 factor.

    Returns the calibrated copy and a :class:`ThresholdCalibration`.
    """
    if not hasattr(sae, "threshold"):
        raise InvalidArgumentError(f"per-feature thresholds need a JumpReLU SAE, got {type(sae).__name__}")
    if getattr(sae.cfg, "normalize_activations", "none") != "none":
        raise InvalidArgumentError(f"calibration needs an SAE without run-time normalisation, got "
                                   f"normalize_activations={sae.cfg.normalize_activations!r}")
    if activations.ndim != 2 or activations.shape[1] != sae.cfg.d_in or activations.shape[0] == 0:
        raise InvalidArgumentError(f"activations must be [n, {sae.cfg.d_in}] with n > 0, got {tuple(activations.shape)}")
    device = torch.device(device) if device is not None else sae.W_dec.device
    work = copy.deepcopy(sae).to(device)
    x = activations.to(device=device, dtype=work.W_dec.dtype)
    W_dec = work.W_dec.detach()
    dec_norm_sq = (W_dec ** 2).sum(-1)
    with torch.no_grad():
        pre = work.process_sae_in(x) @ work.W_enc + work.b_enc
    fired_before = (pre > work.threshold.detach()).sum(0)
    cuts = _Cuts(pre, max_rows or pre.shape[0], torch.ceil(keep * fired_before).long() if keep > 0 else None)

    def measure(theta: Tensor) -> tuple[float, Tensor, Tensor]:
        acts = torch.where(pre > theta, pre.clamp(min=0), torch.zeros_like(pre))
        with torch.no_grad():
            residual = x - work.decode(acts)
        return float((residual ** 2).sum(-1).mean()), acts, residual

    theta0 = work.threshold.detach().clone()
    mse0, acts, residual = measure(theta0)
    l0_before = float((acts > 0).sum(-1).float().mean())
    dead_before = float((fired_before == 0).float().mean())
    target = l0_before if target_l0 is None else float(target_l0)
    theta, best, history, lam = theta0, (math.inf, theta0), [], math.nan
    for step in range(rounds):
        cuts.set_delta(_entry_delta(cuts, residual @ W_dec.T, acts, dec_norm_sq))
        if step == 0:     # lambda is set once, for the target L0; later rounds rescale to it
            cut, lam = cuts.at_l0(target, float(cuts.totals().abs().mean()) / x.shape[0] or 1.0, iterations)
        else:
            cut = cuts.thresholds(lam)[0]
        moved = cut if step == 0 else torch.exp((1 - damping) * theta.log() + damping * cut.log())
        theta = _scaled_to_l0(cuts, moved.clamp(min=THRESHOLD_FLOOR), target, iterations)
        mse, acts, residual = measure(theta)
        history.append(mse)
        if mse < best[0]:
            best = (mse, theta)
    with torch.no_grad():
        work.threshold.copy_(best[1].to(work.threshold.dtype))
    fired = pre > best[1]
    q = torch.quantile(best[1].float(), torch.tensor([0.05, 0.5, 0.95], device=device))
    info = ThresholdCalibration(
        n_tokens=int(x.shape[0]), lam=lam, l0_before=l0_before, l0_after=float(fired.sum(-1).float().mean()),
        mse_before=mse0, mse_after=best[0], threshold_before=float(theta0.float().median()),
        threshold_quantiles=tuple(float(v) for v in q), dead_before=dead_before,  # type: ignore[arg-type]
        dead_after=float((fired.sum(0) == 0).float().mean()), rounds=tuple(history),
    )
    return work.to(sae.W_dec.device), info


def calibrate_bank(
    model: HookedTransformer,
    bank: SAEBank,
    tokens: Int[Tensor, "n_rows ctx"],
    *,
    n_tokens: int = 16_384,
    seed: int = 1,
    max_bytes: int = 1 << 30,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> SAEBank:
    """A new :class:`~tl_featureflow.saes.bank.SAEBank` whose JumpReLU SAEs have per-feature thresholds.

    Each SAE is calibrated (:func:`calibrate_thresholds`) on ``n_tokens`` activations of
    ``tokens`` (training rows, drawn by a seeded :class:`ActivationStream`; position 0
    skipped), keeping its own L0. SAEs are taken a few hooks at a time so that the
    activations held at once stay under ``max_bytes``. The bank's metadata gains
    ``"thresholds"``: the method and each SAE's :class:`ThresholdCalibration`.
    ``bank`` is not modified.
    """
    from tqdm.auto import tqdm

    from tl_featureflow.saes.bank import SAEBank
    from tl_featureflow.saes.stream import ActivationStream

    n_tokens = check_int(n_tokens, "n_tokens", low=1)
    if bank.transcoder_keys:
        raise TranscoderError(f"per-feature thresholds are calibrated on what an SAE reads and reconstructs, one "
                              f"tensor; the transcoders at {bank.transcoder_keys} read one and write another: "
                              "calibrate a bank without them")
    keys = sorted(bank, key=lambda key: (key[1], key[0]))
    per_key = n_tokens * max(sae.cfg.d_in for sae in bank.values()) * 4
    group_size = max(1, max_bytes // per_key)
    chunk_rows = min(64, tokens.shape[0])
    batch_tokens = min(n_tokens, 4096, chunk_rows * (tokens.shape[1] - 1))
    calibrated: dict[Any, Any] = {}
    infos: dict[str, Any] = {}
    with tqdm(total=len(keys), desc="per-feature thresholds", unit="SAE", disable=not progress) as bar:
        for start in range(0, len(keys), group_size):
            group = keys[start:start + group_size]
            hooks = list(dict.fromkeys(bank.hook(key) for key in group))     # hook_z: heads flattened by the stream
            stream = ActivationStream(model, tokens, hooks, batch_tokens=batch_tokens,
                                      chunk_rows=chunk_rows, seed=seed,
                                      last_block=block_of(max(layer for _, layer in group)))
            batches = [stream.batch(i) for i in range(-(-n_tokens // batch_tokens))]
            for key in group:
                x = torch.cat([b[bank.hook(key)] for b in batches])[:n_tokens]
                calibrated[key], info = calibrate_thresholds(bank[key], x, device=device)
                infos[f"{key[1]}/{key[0]}"] = info.to_dict()
                bar.update(1)
            del batches, stream
    meta = {**bank.metadata, "thresholds": {
        "method": "per-feature: min squared error + lambda x L0 per feature at the SAE's own L0 "
                  "(tl_featureflow.saes.thresholds)", "calibration_tokens": n_tokens, "seed": seed, "saes": infos}}
    return SAEBank(calibrated, metadata=meta)

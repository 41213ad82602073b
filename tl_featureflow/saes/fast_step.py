"""A BatchTopK training step that uses the sparsity of its activations (issue 12, part 1).

SAELens's ``BatchTopKTrainingSAE`` step runs autograd over dense ``[batch, d_sae]``
tensors although only ``k`` of every ``d_sae`` activations are non-zero (98% zeros at
k 32 of 1,728). This module computes the same loss and the same gradients by hand:

- forward: the dense encoder matmul (unavoidable: every pre-activation is needed to pick
  the top ``k * batch``), then SAELens's own BatchTopK selection, and a *sparse* decoder
  (``k * batch`` rows of ``W_dec`` gathered and summed);
- backward: every gradient touches only the selected entries: ``dW_dec`` and ``dW_enc``
  are scattered from ``k * batch`` rows, ``d(acts)`` is ``k * batch`` dot products; the
  decoder-norm rescaling (``rescale_acts_by_decoder_norm``) and ``apply_b_dec_to_input``
  are differentiated exactly;
- the auxiliary dead-feature loss (AuxK) is computed on the dead columns only, and not at
  all when no feature is dead.

The maths is SAELens 6.54's ``TopKTrainingSAE.training_forward_pass`` with
``BatchTopK``: ``mse = ((sae_out - x) ** 2).sum(-1).mean()``, ``aux = coef * scale *
((recons - residual) ** 2).sum(-1).mean()`` (tests compare both, and every gradient,
with autograd through SAELens's own SAE).

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> x, W_enc, W_dec = torch.randn(8, 6, generator=g), torch.randn(6, 12, generator=g), torch.randn(12, 6, generator=g)
>>> out = batchtopk_step(x, W_enc, torch.zeros(12), W_dec, torch.zeros(6), k=2.0)
>>> out.rows.numel(), out.grads["W_dec"].shape     # 2 x 8 active entries
(16, torch.Size([12, 6]))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["StepResult", "batchtopk_step", "supports", "train_step", "use_fast_step"]


@dataclass
class StepResult:
    """Loss terms, gradients (by parameter name) and the kept activations ``(rows, cols, values)``."""

    loss: Tensor
    mse: Tensor
    aux: Tensor
    grads: dict[str, Tensor]
    rows: Int[Tensor, " K"]
    cols: Int[Tensor, " K"]
    values: Float[Tensor, " K"]
    sae_out: Float[Tensor, "n d"]


@torch.no_grad()
def batchtopk_step(
    x: Float[Tensor, "n d"],
    W_enc: Float[Tensor, "d m"],
    b_enc: Float[Tensor, " m"],
    W_dec: Float[Tensor, "m d"],
    b_dec: Float[Tensor, " d"],
    *,
    k: float,
    apply_b_dec_to_input: bool = True,
    rescale_acts_by_decoder_norm: bool = True,
    dead_mask: Tensor | None = None,
    aux_loss_coefficient: float = 1.0,
    cutoff: float | None = None,
) -> StepResult:
    """Loss and gradients of one BatchTopK step on the (already scaled) input ``x``.

    ``cutoff``: a guess below the ``k * n``-th largest activation (e.g. a fraction of the
    last step's): the selection then runs on the values above it only, falling back to all
    values when fewer than ``k * n`` pass. The kept set is the same either way.

    The ``k * n`` kept activations form a CSR matrix ``A`` (``[n, d_sae]``, rows sorted);
    decoding is ``A @ W_dec``, ``dW_dec`` is ``A^T @ g``, the activations' gradient is
    ``g @ W_dec^T`` sampled at ``A``'s entries, and ``dW_enc^T`` is ``dPre^T @ x_in``:
    each costs ``k * n * d`` multiply-adds instead of ``n * d_sae * d``.
    """
    n, d = x.shape
    m = W_enc.shape[1]
    x_in = x - b_dec if apply_b_dec_to_input else x
    pre = x_in @ W_enc + b_enc
    norms = W_dec.norm(dim=-1) if rescale_acts_by_decoder_norm else None
    hidden_pre = pre * norms if norms is not None else pre
    values, flat = _batch_topk(hidden_pre.relu().flatten(), int(k * n), cutoff)
    flat, order = flat.sort()
    values = values[order]
    rows, cols = flat // m, flat % m
    norm_c = norms[cols] if norms is not None else None                    # each kept entry's decoder norm
    coef = values / norm_c if norm_c is not None else values               # what multiplies W_dec's rows
    by_col = (cols * n + rows).argsort()                                    # A^T's entry order
    pattern = _Pattern(rows, cols, by_col, n, m)
    sae_out = pattern.matrix(coef) @ W_dec + b_dec
    resid = sae_out - x
    mse = resid.pow(2).sum(-1).mean()
    g = resid * (2.0 / n)                                                   # d mse / d sae_out

    dW_dec = pattern.transposed(coef) @ g
    dcoef = pattern.sampled(g, W_dec)
    dnorms = torch.zeros(m, dtype=x.dtype, device=x.device)
    if norm_c is not None:
        dvalues = dcoef / norm_c
        dhidden = dvalues * (values > 0)                                     # relu's gradient (0 at 0, as torch)
        dnorms.index_add_(0, cols, dhidden * pre[rows, cols] - dcoef * values / norm_c ** 2)
        dpre = dhidden * norm_c
    else:
        dpre = dcoef * (values > 0)
    dW_enc_t = pattern.transposed(dpre) @ x_in
    db_enc = torch.zeros(m, dtype=x.dtype, device=x.device).index_add_(0, cols, dpre)
    db_dec = g.sum(0)

    aux = x.new_zeros(())
    if dead_mask is not None and (n_dead := int(dead_mask.sum())) > 0:
        aux = _aux_step(x_in, pre, hidden_pre, norms, W_dec, -resid, dead_mask, n_dead, aux_loss_coefficient,
                        dW_dec, dW_enc_t, db_enc, dnorms)
    if norms is not None:
        dW_dec += (dnorms / norms)[:, None] * W_dec
    if apply_b_dec_to_input:
        db_dec -= W_enc @ db_enc
    grads = {"W_enc": dW_enc_t.T.contiguous(), "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec}
    return StepResult(mse + aux, mse, aux, grads, rows, cols, values, sae_out)


def _batch_topk(acts: Tensor, K: int, cutoff: float | None) -> tuple[Tensor, Tensor]:
    """The ``K`` largest of ``acts`` (values, flat indices), searched above ``cutoff`` when enough pass.

    Ties at the K-th value go to the lowest indices, so the kept set does not depend on the
    cutoff (a speed hint that a resumed run does not have): ``torch.topk`` alone breaks ties
    differently on the candidates and on the whole (issue 24 #10).
    """
    pool = None
    if cutoff is not None and cutoff > 0:
        candidates = (acts > cutoff).nonzero().squeeze(-1)
        if candidates.numel() >= K:
            pool = candidates
    values = acts if pool is None else acts[pool]
    kth = values.topk(K).values[-1]
    above = (values > kth).nonzero().squeeze(-1)
    ties = (values == kth).nonzero().squeeze(-1)[: K - above.numel()]   # nonzero lists them in index order
    picked = torch.cat([above, ties])
    flat = picked if pool is None else pool[picked]
    return acts[flat], flat


class _Pattern:
    """The kept entries' positions, as CSR matrices of ``[n, m]`` and of its transpose."""

    def __init__(self, rows: Tensor, cols: Tensor, by_col: Tensor, n: int, m: int):
        self.cols, self.rows_t, self.by_col, self.n, self.m = cols, rows[by_col], by_col, n, m
        self.crow = _crow(rows, n)
        self.crow_t = _crow(cols, m)

    def matrix(self, values: Tensor) -> Tensor:
        return _csr(self.crow, self.cols, values, (self.n, self.m))

    def transposed(self, values: Tensor) -> Tensor:
        return _csr(self.crow_t, self.rows_t, values[self.by_col], (self.m, self.n))

    def sampled(self, left: Tensor, right: Tensor) -> Tensor:
        """``(left @ right.T)`` at the pattern's entries, in its (row-major) order."""
        mask = self.matrix(torch.zeros_like(self.cols, dtype=left.dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse.sampled_addmm(mask, left, right.T, beta=0.0).values()


def _crow(index: Tensor, size: int) -> Tensor:
    crow = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    crow[1:] = torch.bincount(index, minlength=size).cumsum(0)
    return crow


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():          # "sparse CSR support is in beta": the maths is tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


def _aux_step(x_in: Tensor, pre: Tensor, hidden_pre: Tensor, norms: Tensor | None, W_dec: Tensor, residual: Tensor,
              dead_mask: Tensor, n_dead: int, coefficient: float, dW_dec: Tensor, dW_enc_t: Tensor, db_enc: Tensor,
              dnorms: Tensor) -> Tensor:
    """AuxK on the dead columns only (SAELens's ``calculate_topk_aux_loss``); gradients added in place."""
    n, d = x_in.shape
    k_aux = d // 2
    scale = min(n_dead / k_aux, 1.0)
    k_aux = min(k_aux, n_dead)
    dead = dead_mask.nonzero().squeeze(-1)
    hp = hidden_pre[:, dead]                                                # [n, n_dead]
    top = hp.topk(k_aux, dim=-1, sorted=False)
    acts = torch.zeros_like(hp).scatter_(-1, top.indices, top.values)      # raw values: no relu in AuxK
    chosen = torch.zeros_like(hp, dtype=torch.bool).scatter_(-1, top.indices, True)
    norm_d = norms[dead] if norms is not None else None
    c = acts / norm_d if norm_d is not None else acts
    W_d = W_dec[dead]
    diff = c @ W_d - residual
    aux = coefficient * scale * diff.pow(2).sum(-1).mean()
    ga = diff * (2.0 * coefficient * scale / n)
    dW_dec.index_add_(0, dead, c.T @ ga)
    dc = ga @ W_d.T
    if norm_d is not None:
        dnorms.index_add_(0, dead, -(dc * acts).sum(0) / norm_d ** 2)
        dh = dc / norm_d * chosen
        dnorms.index_add_(0, dead, (dh * pre[:, dead]).sum(0))
        dp = dh * norm_d
    else:
        dp = dc * chosen
    dW_enc_t.index_add_(0, dead, dp.T @ x_in)
    db_enc.index_add_(0, dead, dp.sum(0))
    return aux


def supports(sae: Any, trainer_cfg: Any = None) -> str | None:
    """Why the fast step cannot train ``sae`` (None when it can): the cases it reproduces exactly."""
    from sae_lens import BatchTopKTrainingSAE

    cfg = sae.cfg
    if type(sae) is not BatchTopKTrainingSAE:
        return f"{type(sae).__name__} is not a plain BatchTopKTrainingSAE"
    if sae.W_enc.dtype != torch.float32:
        return f"dtype {sae.W_enc.dtype} (float32 only)"
    if cfg.normalize_activations not in ("none", "expected_average_only_in"):
        return f"normalize_activations={cfg.normalize_activations!r}"
    if getattr(cfg, "reshape_activations", "none") != "none" or getattr(cfg, "use_sparse_activations", False):
        return "reshaped or sparse activations"
    if trainer_cfg is not None and getattr(trainer_cfg, "autocast", False):
        return "autocast"
    return None


def train_step(trainer: Any, sae: Any, sae_in: Tensor, state: dict[str, Any]) -> Any:
    """What SAELens's ``SAETrainer._train_step`` does, with :func:`batchtopk_step` for the maths.

    Same order as SAELens: forward, firing statistics (``n_forward_passes_since_fired``,
    ``act_freq_scores``), BatchTopK's running threshold, gradients, ``clip_grad_norm_(1.0)``,
    the trainer's own Adam and schedulers. ``state`` carries the selection cutoff
    between steps (speed only: the kept set does not depend on it).
    """
    from sae_lens.saes.sae import TrainStepOutput

    sae.train()
    result = batchtopk_step(sae_in.to(sae.W_enc.dtype), sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach(),
                            sae.b_dec.detach(), k=sae.cfg.k, apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
                            rescale_acts_by_decoder_norm=sae.cfg.rescale_acts_by_decoder_norm,
                            dead_mask=trainer.dead_neurons, aux_loss_coefficient=sae.cfg.aux_loss_coefficient,
                            cutoff=state.get("cutoff"))
    m = sae.cfg.d_sae
    with torch.no_grad():
        fired = result.cols[result.values > 0]
        counts = torch.bincount(fired, minlength=m).to(trainer.act_freq_scores.dtype)
        trainer.n_forward_passes_since_fired += 1
        trainer.n_forward_passes_since_fired[counts > 0] = 0
        trainer.act_freq_scores += counts
        trainer.n_frac_active_samples += trainer.cfg.train_batch_size_samples
        positive = result.values[result.values > 0]
        if positive.numel():                     # BatchTopKTrainingSAE.update_topk_threshold
            lr = sae.cfg.topk_threshold_lr
            sae.topk_threshold = (1 - lr) * sae.topk_threshold + lr * positive.min().to(sae.topk_threshold.dtype)
            state["cutoff"] = 0.8 * float(positive.min())
    for name, param in sae.named_parameters():
        param.grad = result.grads[name]
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    trainer.lr_scheduler.step()
    for scheduler in trainer.coefficient_schedulers.values():
        scheduler.step()
    n = sae_in.shape[0]
    acts = torch.sparse_coo_tensor(torch.stack([result.rows, result.cols]), result.values, (n, m))
    return TrainStepOutput(sae_in=sae_in, sae_out=result.sae_out, feature_acts=acts, hidden_pre=torch.empty(0),
                           loss=result.loss, losses={"mse_loss": result.mse,
                                                     "auxiliary_reconstruction_loss": result.aux},
                           metrics={"topk_threshold": sae.topk_threshold})


def use_fast_step(trainer: Any, *, fused_adam: bool = True) -> str | None:
    """Make one SAELens ``SAETrainer`` run :func:`train_step` (through ``_compat.replace_train_step``).
    Returns why it cannot (the SAE's kind is not supported: SAELens's step stays), or None.

    ``fused_adam``: the trainer's Adam takes torch's fused step (``_compat.fuse_adam``; 0.44 vs
    5.96 ms per step at width 1,728 on this CPU, the same update to float rounding), which
    made Adam 12% of a `deep` training's time before.
    """
    from tl_featureflow import _compat

    reason = supports(trainer.sae, trainer.cfg)
    if reason is None:
        state: dict[str, Any] = {}
        _compat.replace_train_step(trainer, lambda sae, sae_in: train_step(trainer, sae, sae_in, state))
        if fused_adam:
            _compat.fuse_adam(trainer)
    return reason

"""Preflight: does each SAE of a bank reconstruct its site on this model? Checked before trusting a flow.

An SAE attached to the wrong tensor, or to a model whose weights were processed otherwise than
the one it was trained on, still runs: it just reconstructs noise. Known traps: on sandwich-norm
models (Gemma 2/3) ``hook_mlp_out`` is the post-norm output, and an SAE meant for the pre-norm one
"works" with a fraction of variance unexplained (FVU) near 10; SAELens releases say how their
model must be loaded (``model_from_pretrained_kwargs``: ``fold_ln``, ``center_writing_weights``...).

:func:`preflight` measures the FVU of every SAE on a few hundred tokens, with the definition of
:mod:`tl_featureflow.saes.quality` (``FVU = sum |x - sae(x)|^2 / sum |x - mean(x)|^2``, position 0
skipped; ``1 - explained variance``), and names each SAE past ``max_fvu`` with its FVU and the
likely causes.

>>> import torch
>>> from tl_featureflow.synthetic import random_bank, tiny_model
>>> model, bank = tiny_model(), random_bank([1], ("res",), d_model=64)
>>> result = preflight(model, bank, torch.randint(0, 100, (2, 16)), on_fail="ignore")
>>> result.rows[0].key, result.rows[0].fvu > 0
(('res', 1), True)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from jaxtyping import Int
from torch import Tensor

from tl_featureflow.checks import check_number, check_tokens
from tl_featureflow.errors import InvalidArgumentError, ModelMismatchError
from tl_featureflow.refs import Key
from tl_featureflow.saes.bank import SAEBank

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["preflight", "Preflight", "PreflightRow", "PreflightWarning", "DEFAULT_MAX_FVU"]

#: FVU above which an SAE is taken not to read its site: trained SAEs of every suite we load sit well
#: below (Gemma Scope: 0.05-0.4; this project's banks 0.06-0.5), a wrong tensor near or above 1.
DEFAULT_MAX_FVU = 0.9


class PreflightWarning(UserWarning):
    """An SAE of a bank does not reconstruct its site on this model (see :func:`preflight`)."""


@dataclass(frozen=True)
class PreflightRow:
    key: Key
    hook: str
    fvu: float
    ok: bool
    cause: str = ""


@dataclass
class Preflight:
    """The FVU of every SAE; ``failed`` lists those past ``max_fvu``."""

    rows: list[PreflightRow]
    max_fvu: float
    n_tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[PreflightRow]:
        return [row for row in self.rows if not row.ok]

    def message(self) -> str:
        lines = [f"{row.key} on {row.hook}: FVU {row.fvu:.2f} > {self.max_fvu} ({row.cause})" for row in self.failed]
        return (f"{len(self.failed)} of {len(self.rows)} SAEs do not reconstruct their site on this model "
                f"({self.n_tokens} tokens):\n  " + "\n  ".join(lines))

    def __repr__(self) -> str:
        worst = max(self.rows, key=lambda r: r.fvu)
        return (f"Preflight({len(self.rows)} SAEs on {self.n_tokens} tokens, {len(self.failed)} past FVU "
                f"{self.max_fvu}; worst {worst.key} FVU {worst.fvu:.2f})")


def _cause(model: HookedTransformer, bank: SAEBank, key: Key) -> str:
    """The likely reasons an SAE fails, from what the model and the SAE's config say."""
    causes = []
    cfg = model.cfg
    if getattr(cfg, "use_normalization_before_and_after", False) and key[0] in ("mlp", "att"):
        causes.append(f"this model norms its {key[0]} output after the module (Gemma 2/3): hook "
                      f"{bank.hook(key)!r} is the post-norm tensor; an SAE trained before the norm reads the wrong one")
    kwargs = getattr(bank[key].cfg.metadata, "model_from_pretrained_kwargs", None) or {}
    if kwargs:
        folded = str(getattr(cfg, "normalization_type", "")).endswith("Pre")
        if "fold_ln" in kwargs and bool(kwargs["fold_ln"]) != folded:
            causes.append(f"the SAE was trained on a model loaded with fold_ln={kwargs['fold_ln']}, this one has "
                          f"normalization_type={cfg.normalization_type!r}")
        causes.append(f"its release loads the model with {kwargs}: load yours the same way")
    model_name = getattr(bank[key].cfg.metadata, "model_name", None)
    if model_name and getattr(cfg, "model_name", None) and model_name not in (cfg.model_name, "unknown"):
        causes.append(f"the SAE was trained on {model_name!r}, this model is {cfg.model_name!r}")
    return "; ".join(causes) or "the SAE reads another tensor or another model than this one"


def preflight(
    model: HookedTransformer,
    bank: SAEBank,
    tokens: Int[Tensor, "batch pos"],
    *,
    max_fvu: float = DEFAULT_MAX_FVU,
    on_fail: Literal["warn", "raise", "ignore"] = "warn",
    batch_size: int = 8,
) -> Preflight:
    """The FVU of every SAE of ``bank`` on ``tokens`` (a few hundred held-out tokens of real text, BOS first).

    Args:
        on_fail: what to do when an SAE is past ``max_fvu``: a :class:`PreflightWarning` (default),
            a :class:`~tl_featureflow.errors.ModelMismatchError` naming each SAE, its FVU and the
            likely cause, or nothing (read ``.failed``).
    """
    from tl_featureflow.saes.quality import evaluate_bank

    if on_fail not in ("warn", "raise", "ignore"):
        raise InvalidArgumentError(f"on_fail={on_fail!r}: expected 'warn', 'raise' or 'ignore'")
    check_number(max_fvu, "max_fvu", positive=True)
    check_tokens(tokens, model.cfg.d_vocab, n_ctx=model.cfg.n_ctx)
    bank = bank.bind(model)                 # z-SAEs: n_heads * d_head checked
    if bank.d_model != model.cfg.d_model or bank.layers[-1] >= model.cfg.n_layers:
        raise ModelMismatchError(f"the bank ({bank.describe()}, d_in {bank.d_model}) does not fit the model "
                                 f"(d_model {model.cfg.d_model}, {model.cfg.n_layers} layers)")
    report = evaluate_bank(model, bank, tokens, batch_size=batch_size, loss_rows=0, progress=False)
    rows = []
    for q in report.rows:
        key: Key = (q.site, q.layer)
        fvu = 1.0 - q.explained_variance
        ok = fvu <= max_fvu
        rows.append(PreflightRow(key, bank.hook(key), fvu, ok, "" if ok else _cause(model, bank, key)))
    result = Preflight(rows, max_fvu, int(tokens.shape[0] * (tokens.shape[1] - 1)))
    if result.failed and on_fail == "raise":
        raise ModelMismatchError(result.message())
    if result.failed and on_fail == "warn":
        warnings.warn(result.message(), PreflightWarning, stacklevel=2)
    return result

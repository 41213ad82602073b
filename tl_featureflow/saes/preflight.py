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

It also runs by itself (:func:`preflight_on_load`) when a bank of SAELens releases
(:meth:`SAEBank.from_pretrained <tl_featureflow.saes.bank.SAEBank.from_pretrained>`, which marks
it: ``bank.metadata["preflight"] == "on_load"``, kept by ``select``, ``bind`` and save/load)
first meets a model: ``model.attach(bank)``, ``FlowTracer(bank, model)``, ``validate(...)``. Once
per SAE and model (the model's weights: wrappers sharing them count as one), on
:data:`AUTO_PREFLIGHT_TOKENS` tokens of a short built-in text (random token ids from a fixed
generator when the model has no tokenizer), it warns (:class:`PreflightWarning`) and never
raises. Banks trained by this project or built from SAE objects are not checked (training
measured them). Turn it off with ``preflight=False`` on those calls, or everywhere with the
environment variable ``TL_FEATUREFLOW_PREFLIGHT=0``.

>>> import torch
>>> from tl_featureflow.synthetic import random_bank, tiny_model
>>> model, bank = tiny_model(), random_bank([1], ("res",), d_model=64)
>>> result = preflight(model, bank, torch.randint(0, 100, (2, 16)), on_fail="ignore")
>>> result.rows[0].key, result.rows[0].fvu > 0
(('res', 1), True)
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from tl_featureflow.backend import backend_of
from tl_featureflow.checks import check_int, check_number, check_tokens
from tl_featureflow.errors import InvalidArgumentError, ModelMismatchError
from tl_featureflow.refs import Key
from tl_featureflow.saes.bank import PRETRAINED_SOURCE, SAEBank

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["preflight", "weight_processing_mismatches", "Preflight", "PreflightRow", "PreflightWarning",
           "DEFAULT_MAX_FVU", "preflight_on_load", "checks_on_load", "preflight_tokens", "PREFLIGHT_ENV", "AUTO_PREFLIGHT_TOKENS", "ON_LOAD"]

#: FVU above which an SAE is taken not to read its site: trained SAEs of every suite we load sit well
#: below (Gemma Scope: 0.05-0.4; this project's banks 0.06-0.5), a wrong tensor near or above 1.
DEFAULT_MAX_FVU = 0.9


class PreflightWarning(UserWarning):
    """An SAE of a bank does not reconstruct its site on this model (see :func:`preflight`)."""


#: ``bank.metadata["preflight"]`` of a bank checked automatically when it first meets a model (set by
#: ``SAEBank.from_pretrained``; set it on a bank of your own to have it checked, or to ``"off"`` to never).
ON_LOAD = "on_load"
#: The environment variable that turns the automatic preflight off everywhere: ``0``, ``false``, ``off`` or ``no``.
PREFLIGHT_ENV = "TL_FEATUREFLOW_PREFLIGHT"
#: How many tokens (past each row's first) the automatic preflight reads.
AUTO_PREFLIGHT_TOKENS = 256

#: The automatic preflight's text: plain prose of several registers, a few hundred tokens in any tokenizer.
PREFLIGHT_TEXT = (
    "The old lighthouse stood at the edge of the cliff for more than a century. Every night its keeper climbed "
    "the narrow stairs, trimmed the wick and watched the beam sweep across the dark water. Ships that passed "
    "the rocks owed their safety to that steady light, though few of their sailors ever knew his name.\n\n"
    "In 1969, two astronauts walked on the surface of the Moon while a third orbited above them. They collected "
    "rock samples, planted a flag and left footprints that may last for millions of years, since there is no "
    "wind or rain to erase them.\n\n"
    "To make a simple bread, mix 500 grams of flour with a teaspoon of salt, a packet of dried yeast and about "
    "300 millilitres of warm water. Knead the dough for ten minutes, let it rise for an hour, shape it, and bake "
    "it at 220 degrees Celsius until the crust is golden and sounds hollow when tapped.\n\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "The committee met on Tuesday to discuss the budget. After a long debate, members agreed to increase "
    "funding for public libraries and to delay the new parking garage until next year. Critics said the "
    "decision ignored the needs of commuters, while supporters praised it as an investment in education.\n\n"
    "Water boils at a lower temperature on a mountain because the air pressure is lower there. Climbers who "
    "cook pasta at high altitude often find that it takes much longer to soften than it would at sea level."
)

#: id(model's first weight) -> (a weak reference to it, the SAEs checked on it). Not a WeakKeyDictionary:
#: its lookups compare keys with ``==``, which tensors answer elementwise.
_CHECKED: dict[int, tuple[weakref.ref[Any], weakref.WeakSet[Any]]] = {}


def _checked_on(owner: Any) -> weakref.WeakSet[Any]:
    """The SAEs the automatic preflight has checked on ``owner`` (a model's first weight), kept while it lives."""
    entry = _CHECKED.get(id(owner))
    if entry is None or entry[0]() is not owner:
        key = id(owner)
        entry = (weakref.ref(owner, lambda _ref, key=key: _CHECKED.pop(key, None)), weakref.WeakSet())
        _CHECKED[key] = entry
    return entry[1]


@dataclass(frozen=True)
class PreflightRow:
    key: Key
    hook: str
    fvu: float
    ok: bool
    cause: str = ""
    name: str = ""          # the SAE's release and id, when the bank knows them (SAEBank.from_pretrained)
    processing: tuple[str, ...] = ()   # how the model's weights differ from what the SAE's release loads


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
        lines = [f"{row.name + ' at ' if row.name else ''}{row.key} on {row.hook}: FVU {row.fvu:.2f}"
                 + (f" > {self.max_fvu} ({row.cause})" if row.fvu > self.max_fvu else "")
                 + "".join(f"; {p}" for p in row.processing) for row in self.failed]
        return (f"{len(self.failed)} of {len(self.rows)} SAEs do not reconstruct their site or do not fit this model "
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


# ``model_from_pretrained_kwargs`` keys that change what an SAE reading ``hook`` sees, by the hook's kind:
# folding a norm's weight changes ``ln*.hook_normalized`` (a transcoder's input); centring the writing
# weights changes the residual stream and what the modules write into it (a norm's output is unchanged).
def _affected(hook: str) -> set[str]:
    if "hook_normalized" in hook:
        return {"fold_ln"}
    if hook.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")):
        return {"center_writing_weights"}
    return set()


def weight_processing_mismatches(model: HookedTransformer, sae: Any, read_hook: str, *,
                                 shown: Mapping[str, bool] | None = None) -> list[str]:
    """How ``model``'s weight processing differs from what ``sae``'s release says it was trained on.

    SAELens releases name the processing in ``cfg.metadata.model_from_pretrained_kwargs`` (GPT-2
    ``res-jb``: ``center_writing_weights=True``; transcoders: ``fold_ln=False``); the model's side comes
    from its weights (:meth:`~tl_featureflow.backend.ModelBackend.weight_processing`). Only keys the
    release states, the weights can tell, and that change the tensor the SAE reads are compared.
    ``shown``: the model's side when already read (a bank's preflight reads it once for all its SAEs).

    >>> from types import SimpleNamespace as NS
    >>> from tl_featureflow.synthetic import tiny_model
    >>> sae = NS(cfg=NS(metadata=NS(model_from_pretrained_kwargs={"fold_ln": False})))
    >>> weight_processing_mismatches(tiny_model(), sae, "blocks.1.ln2.hook_normalized")   # tiny_model: RMS, unfolded
    []
    """
    wanted = getattr(sae.cfg.metadata, "model_from_pretrained_kwargs", None) or {}
    shown = backend_of(model).weight_processing() if shown is None else shown
    return [f"its release loads the model with {name}={bool(wanted[name])}, this model's weights show "
            f"{name}={shown[name]}: load it with HookedTransformer.from_pretrained(..., {name}={bool(wanted[name])})"
            for name in sorted(_affected(read_hook) & set(wanted) & set(shown)) if bool(wanted[name]) != shown[name]]


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

    An SAE also fails when the model's weight processing differs from what its release says it was trained
    on (:func:`weight_processing_mismatches`), whatever its FVU: a mean shift or a norm's weight can leave the
    FVU low while the features read something else.

    Args:
        on_fail: what to do when an SAE fails: a :class:`PreflightWarning` (default),
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
    shown = backend_of(model).weight_processing()
    for q in report.rows:
        key: Key = (q.site, q.layer)
        fvu = 1.0 - q.explained_variance
        processing = tuple(weight_processing_mismatches(model, bank[key], bank.read_hook(key), shown=shown))
        ok = fvu <= max_fvu and not processing
        rows.append(PreflightRow(key, bank.hook(key), fvu, ok, "" if fvu <= max_fvu else _cause(model, bank, key),
                                 _sae_name(bank, key), processing))
    result = Preflight(rows, max_fvu, int(tokens.shape[0] * (tokens.shape[1] - 1)))
    if result.failed and on_fail == "raise":
        raise ModelMismatchError(result.message())
    if result.failed and on_fail == "warn":
        warnings.warn(result.message(), PreflightWarning, stacklevel=2)
    return result


def _sae_name(bank: SAEBank, key: Key) -> str:
    """``release/sae_id`` of the SAE at ``key`` as ``SAEBank.from_pretrained`` recorded it, else ``""``."""
    names = bank.metadata.get("sae_ids")
    found = names.get(f"{key[1]}/{key[0]}") if isinstance(names, dict) else None
    return f"SAE {found[0]!r} {found[1]!r}" if isinstance(found, (list, tuple)) and len(found) == 2 else ""


def checks_on_load(bank: SAEBank) -> bool:
    """Whether :func:`preflight_on_load` checks ``bank``: ``bank.metadata["preflight"] == "on_load"`` (what
    ``SAEBank.from_pretrained`` sets), or, for banks saved before that mark existed, a bank of SAELens releases
    (``metadata["source"]``). Banks trained here or built from SAE objects carry neither."""
    mark = bank.metadata.get("preflight")
    if mark is not None:
        return mark == ON_LOAD
    return bank.metadata.get("source") == PRETRAINED_SOURCE


def _env_allows() -> bool:
    return os.environ.get(PREFLIGHT_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def preflight_tokens(model: Any, n_tokens: int = AUTO_PREFLIGHT_TOKENS, *, seed: int = 0
                     ) -> tuple[Int[Tensor, "rows pos"], str]:
    """The automatic preflight's tokens and where they come from: :data:`PREFLIGHT_TEXT` through the model's
    tokenizer (rows of up to 64 tokens, each after a BOS when the tokenizer has one, the text cycled to reach
    ``n_tokens``), or, without a usable tokenizer, random ids from a generator seeded with ``seed``.
    Position 0 of each row is skipped by the FVU, so ``n_tokens`` count past it."""
    check_int(n_tokens, "n_tokens", low=1)
    backend = backend_of(model)
    d_vocab, n_ctx = backend.d_vocab, backend.n_ctx or 65
    body = max(1, min(64, n_ctx - 1))
    n_rows = math.ceil(n_tokens / body)
    tokenizer = backend.tokenizer
    ids: list[int] = []
    if tokenizer is not None:
        try:
            ids = list(tokenizer(PREFLIGHT_TEXT, add_special_tokens=False)["input_ids"])
        except Exception:  # a tokenizer of another kind: fall back to random ids
            ids = []
    bos = getattr(tokenizer, "bos_token_id", None) if ids else None
    if ids and max(ids) < d_vocab and (bos is None or bos < d_vocab):
        stream = (ids * math.ceil(n_rows * body / len(ids)))[:n_rows * body]
        rows = torch.tensor(stream, dtype=torch.long).view(n_rows, body)
        first = torch.full((n_rows, 1), bos if bos is not None else ids[0], dtype=torch.long)
        return torch.cat([first, rows], dim=1), f"{n_rows * body} tokens of built-in text"
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, d_vocab, (n_rows, body + 1), generator=generator),
            f"{n_rows * body} random token ids (the model has no tokenizer)")


def preflight_on_load(model: Any, bank: SAEBank, *, enabled: bool = True, stacklevel: int = 3) -> Preflight | None:
    """The automatic preflight: :func:`preflight` of the SAEs of a bank marked for it (:func:`checks_on_load`)
    that have not met this model yet, on :func:`preflight_tokens`, with a :class:`PreflightWarning` naming
    each SAE past :data:`DEFAULT_MAX_FVU`, its FVU and the likely cause. Never raises on a bad SAE.

    ``model.attach``, ``FlowTracer(bank, model)`` and ``validate`` call it; each SAE is checked once per
    model (keyed by the model's first weight tensor, so wrappers sharing the weights count as one model).
    Returns None when nothing was checked: ``enabled=False``, the environment variable
    :data:`PREFLIGHT_ENV` set to ``0``, a bank not marked, every SAE checked already, or a model with SAEs
    spliced in (their outputs would be measured, not the model's).
    """
    if not enabled or not _env_allows() or not checks_on_load(bank):
        return None
    if getattr(model, "acts_to_saes", None):
        return None
    owner = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    owner = owner if owner is not None else model
    checked = _checked_on(owner)
    todo = {key: sae for key, sae in bank.items() if sae not in checked}
    if not todo:
        return None
    tokens, source = preflight_tokens(model)
    result = preflight(model, SAEBank(todo, metadata=bank.metadata), tokens, on_fail="ignore")
    checked.update(todo.values())
    if result.failed:
        warnings.warn(
            f"automatic preflight on load (bank.metadata['preflight'] == {ON_LOAD!r}, as SAEBank.from_pretrained "
            f"marks banks of SAELens releases) on {source}: {result.message()}\n"
            f"Run saes.preflight.preflight(model, bank, tokens) on held-out text of your own for a firmer number; "
            f"turn this check off with preflight=False or {PREFLIGHT_ENV}=0.",
            PreflightWarning, stacklevel=stacklevel)
    return result

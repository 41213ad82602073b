"""Steering sweeps: a grid of settings run as the rows of batched ``generate`` calls.

TransformerLens's ``generate`` costs about as much for 16 rows as for one on a CPU
(it is dominated by per-step weight copies), so a grid of strengths x layers x modes x
samples runs as rows of a few batched calls, each row with its own coefficients (a
:class:`~tl_featureflow.steer.steerer.Steerer` with per-row coefficient vectors).

>>> import torch
>>> from tl_featureflow.flow.tracer import FlowTracer
>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> model, (bank, _) = tiny_model(), planted_chain_bank()
>>> graph = FlowTracer(bank).trace("2/res/1")
>>> settings = SweepSettings(strengths=(4.0, 16.0), layers=(2,), max_new_tokens=3, do_sample=False,
...                          scale="unit")   # the tiny model has no tokenizer for "typical"
>>> sweep = steering_sweep(model, bank, graph, settings, prompt_tokens=torch.tensor([1, 2]), progress=False)
>>> len(sweep.rows), sweep.meta["generate_calls"]   # baseline + 2 modes x 1 layer x 2 strengths, one batch
(5, 1)

With a text prompt and a judge: ``sweep.score(OfflineJudge(model), "anger and rage").summary()``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from tqdm.auto import tqdm

from tl_featureflow._files import atomic_write_json, check_header, header, read_json
from tl_featureflow.backend import backend_of
from tl_featureflow.checks import check_tokens
from tl_featureflow.errors import CacheError, InvalidArgumentError, StateError, UnknownFeatureError
from tl_featureflow.refs import FeatureRef
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.steer.judge import NEUTRAL_TEXTS, OfflineJudge, perplexity_of_rows
from tl_featureflow.steer.steerer import Op, Positions, Schedule, Steerer, flow_coefficients

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["SweepSettings", "SweepSetting", "SweepRow", "SteeringSweep", "steering_sweep", "sweep_settings",
           "setting_coefficients", "generate_rows", "GeneratedRows", "generation_seconds", "format_seconds",
           "SWEEP_SCHEMA_VERSION"]

SWEEP_SCHEMA_VERSION = 2
_T = TypeVar("_T")


def settings_from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
    """A settings dataclass from its ``asdict`` form read back from JSON (lists as tuples; unknown keys ignored)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})


@dataclass(frozen=True)
class SweepSettings:
    """Everything that defines a steering sweep; saved with it and read back by field.

    Defaults are the paper's (36 new tokens, top_p 0.7, temperature 1.27), with the
    prompt ``"I think"``: SmolLM2's tokenizer makes the trailing space of the paper's
    ``"I think "`` a token of its own, after which the model writes digits.

    >>> SweepSettings(strengths=(4.0,), samples=2).grid_size(n_layers=3)   # 2 x (baseline + 2 modes x 3)
    14
    """

    prompt: str | None = "I think"
    strengths: tuple[float, ...] = (2.0, 4.0, 8.0)
    layers: tuple[int, ...] | None = None
    modes: tuple[str, ...] = ("single", "cumulative")
    op: Op = "add"
    schedule: Schedule = "constant"
    alpha: float = -0.05
    samples: int = 1
    baseline: bool = True
    max_new_tokens: int = 36
    do_sample: bool = True
    top_p: float | None = 0.7
    temperature: float = 1.27
    seed: int = 0
    batch_size: int = 16
    batched: bool = True
    positions: Positions = "all"
    scale: str = "typical"

    def __post_init__(self) -> None:
        object.__setattr__(self, "strengths", tuple(float(x) for x in self.strengths))
        object.__setattr__(self, "modes", tuple(self.modes))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if self.samples < 1 or self.batch_size < 1:
            raise InvalidArgumentError(
                f"samples and batch_size must be >= 1, got {self.samples} and {self.batch_size}")
        bad = [m for m in self.modes if m not in ("single", "cumulative")]
        if bad or not self.modes:
            raise InvalidArgumentError(f"unknown modes {bad or self.modes}: expected 'single' and/or 'cumulative'")

    def grid_size(self, n_layers: int) -> int:
        """Rows of a sweep over ``n_layers`` layers (baseline included)."""
        return self.samples * (int(self.baseline) + len(self.modes) * n_layers * len(self.strengths))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSettings:
        """Settings from :meth:`to_dict`; unknown keys are ignored. Files without ``scale``
        were written when ``"unit"`` was the only scale."""
        return settings_from_dict(cls, {"scale": "unit", **data})


@dataclass(frozen=True)
class SweepSetting:
    """One point of the grid: ``mode`` is ``"baseline"`` (no steering), ``"single"`` or ``"cumulative"``."""

    mode: str
    layer: int | None
    strength: float
    op: str = "add"


@dataclass
class SweepRow:
    """One generation of a sweep, with its judge scores once :meth:`SteeringSweep.score` ran."""

    mode: str
    layer: int | None
    strength: float
    op: str
    sample: int
    text: str
    tokens: list[int]
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def setting(self) -> SweepSetting:
        return SweepSetting(self.mode, self.layer, self.strength, self.op)


@dataclass
class SteeringSweep:
    """Results of :func:`steering_sweep`: one row per generation, the settings that made them,
    and facts of the run in ``meta`` (seed feature, prompt tokens, stop token, seconds,
    ``generate`` calls, and the judge's calibration once scored)."""

    rows: list[SweepRow]
    settings: SweepSettings
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        scored = "scored" if any(r.scores for r in self.rows) else "not scored"
        return (f"SteeringSweep({len(self.rows)} generations, {len(self.baseline())} unsteered, seed "
                f"{self.meta.get('seed', '?')}, {scored}; .summary() for the table)")

    def baseline(self) -> list[SweepRow]:
        return [r for r in self.rows if r.mode == "baseline"]

    def score(self, judge: OfflineJudge, topic: str, *, suppress: bool = False,
              on_topic: Sequence[str] | None = None) -> SteeringSweep:
        """Fill each row's ``behavioural``, ``coherence``, ``ppl`` and ``score`` (in place; returns self).

        The judge is calibrated on this sweep's baseline rows (see
        :meth:`OfflineJudge.calibrate`): for promotion they are the off-topic anchor, for
        suppression the on-topic one (with :data:`NEUTRAL_TEXTS` as off-topic).
        """
        base = self.baseline()
        if not base:
            raise StateError("scoring a sweep needs its baseline rows: run steering_sweep(..., baseline=True)")
        model = judge.model
        if model is None:
            raise InvalidArgumentError("scoring a sweep needs the judge's language model: OfflineJudge(model)")
        prompt = torch.tensor([self.meta["prompt_tokens"]])
        ppl = perplexity_of_rows(model, prompt, [r.tokens for r in self.rows], self.meta.get("stop_token"))
        base_idx = [i for i, r in enumerate(self.rows) if r.mode == "baseline"]
        base_texts = [self.rows[i].text for i in base_idx]
        if suppress:
            judge.calibrate(topic, off_topic=list(NEUTRAL_TEXTS), on_topic=on_topic or base_texts,
                            reference_ppl=ppl[base_idx], reference_tokens=[self.rows[i].tokens for i in base_idx])
        else:
            judge.calibrate(topic, off_topic=base_texts, on_topic=on_topic, reference_ppl=ppl[base_idx],
                            reference_tokens=[self.rows[i].tokens for i in base_idx])
        b = judge.behavioural([r.text for r in self.rows])
        c = judge.coherence(ppl, [r.tokens for r in self.rows])
        s = judge.combine(b, c, suppress=suppress)
        for i, row in enumerate(self.rows):
            row.scores = {"behavioural": float(b[i]), "coherence": float(c[i]), "ppl": float(ppl[i]),
                          "score": float(s[i])}
        self.meta["judge"] = {"topic": topic, "suppress": suppress, **judge.calibration.to_dict()}  # type: ignore
        return self

    def summary(self, metric: str = "score") -> dict[SweepSetting, float]:
        """Mean ``metric`` over samples for each setting (baseline included)."""
        sums: dict[SweepSetting, list[float]] = {}
        for row in self.rows:
            if metric not in row.scores:
                raise StateError(f"rows have no {metric!r} score: call sweep.score(judge, topic) first")
            sums.setdefault(row.setting, []).append(row.scores[metric])
        return {k: sum(v) / len(v) for k, v in sums.items()}

    def best(self, metric: str = "score", mode: str | None = None) -> tuple[SweepSetting, float]:
        """The setting with the highest mean ``metric`` (optionally within one mode)."""
        table = {k: v for k, v in self.summary(metric).items() if k.mode != "baseline" and mode in (None, k.mode)}
        if not table:
            raise InvalidArgumentError(f"no steered settings{f' with mode {mode!r}' if mode else ''} in this sweep")
        return max(table.items(), key=lambda kv: kv[1])

    def to_pandas(self):  # type: ignore[no-untyped-def]
        import pandas as pd

        return pd.DataFrame([{**{k: v for k, v in asdict(r).items() if k not in ("scores", "tokens")}, **r.scores}
                             for r in self.rows])

    def save(self, path: str | Path) -> Path:
        """Write the sweep as JSON (atomically); :meth:`load` reads it back."""
        path = Path(path)
        atomic_write_json(path, {**header("SteeringSweep", SWEEP_SCHEMA_VERSION),
                                 "settings": self.settings.to_dict(), "meta": self.meta,
                                 "rows": [asdict(r) for r in self.rows]})
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringSweep:
        """Read a sweep written by :meth:`save` (schema 2)."""
        path = Path(path)
        data = read_json(path, "a steering sweep")
        try:
            rows = [SweepRow(**r) for r in data["rows"]]
            check_header(data, "SteeringSweep", SWEEP_SCHEMA_VERSION, path)
            return cls(rows, SweepSettings.from_dict(data["settings"]), data["meta"])
        except (ValueError, KeyError, TypeError, AttributeError, InvalidArgumentError) as exc:
            raise CacheError(f"{path} is not a saved steering sweep ({exc})") from exc


def sweep_settings(
    graph: Any,
    strengths: Sequence[float],
    *,
    layers: Sequence[int] | None = None,
    modes: Sequence[str] = ("single", "cumulative"),
    op: Op = "add",
    baseline: bool = True,
) -> list[SweepSetting]:
    """The grid: baseline (if asked) then every mode x layer x strength."""
    graph_layers = sorted({n.ref.layer for n in graph.nodes})
    layers = list(layers) if layers is not None else graph_layers
    missing = [layer for layer in layers if layer not in graph_layers]
    if missing and "single" in modes:
        raise UnknownFeatureError(f"layers {missing} have no feature in the flow graph of {graph.seed} "
                                  f"(its layers: {graph_layers})")
    settings = [SweepSetting("baseline", None, 0.0, op)] if baseline else []
    for mode in modes:
        if mode not in ("single", "cumulative"):
            raise InvalidArgumentError(f"unknown mode {mode!r}: expected 'single' or 'cumulative'")
        settings += [SweepSetting(mode, layer, float(s), op) for layer in layers for s in strengths]
    return settings


def steering_sweep(
    model: HookedTransformer,
    bank: SAEBank,
    graph: Any,
    settings: SweepSettings | None = None,
    *,
    prompt_tokens: torch.Tensor | None = None,
    scale: Any = None,
    progress: bool = True,
    **overrides: Any,
) -> SteeringSweep:
    """Generate from the prompt under every setting of the grid, ``samples`` times each.

    ``settings`` (a :class:`SweepSettings`) says what to run; keyword arguments named
    like its fields override it (``steering_sweep(model, bank, graph, strengths=[4, 8])``).
    ``prompt_tokens`` replaces the text prompt with token ids (``settings.prompt`` is then
    None; the ids are in ``meta["prompt_tokens"]``); ``scale`` may be a
    mapping ``ref -> typical activation`` (see :class:`Steerer`), recorded as
    ``"mapping"``.

    Rows are (setting, sample) pairs, run ``batch_size`` at a time as the rows of one
    ``generate``; ``batched=False`` runs each setting on its own (the slow reference;
    with greedy decoding both give the same tokens). ``torch.manual_seed(seed + i)``
    before the i-th call makes a sweep reproducible; sampled rows depend on how rows
    are batched.
    """
    if "prompt" in overrides and not isinstance(overrides["prompt"], str | None):
        prompt_tokens = torch.as_tensor(overrides.pop("prompt"))   # version-1 callers passed tokens as prompt
    if prompt_tokens is not None:
        overrides["prompt"] = None   # the settings record what was run: token ids, no text
    if scale is not None:
        overrides["scale"] = scale if isinstance(scale, str) else "mapping"
    unknown = sorted(set(overrides) - {f.name for f in fields(SweepSettings)})
    if unknown:
        raise InvalidArgumentError(f"steering_sweep got unknown settings {unknown}: expected fields of SweepSettings")
    settings = replace(settings or SweepSettings(), **overrides)
    steer_scale = scale if scale is not None and not isinstance(scale, str) else settings.scale
    prompt_ids = _prompt_tokens(model, settings, prompt_tokens)
    grid = sweep_settings(graph, settings.strengths, layers=settings.layers, modes=settings.modes, op=settings.op,
                          baseline=settings.baseline)
    plan = [(s, k) for s in grid for k in range(settings.samples)]
    coefficients = {s: setting_coefficients(graph, s, settings.schedule, settings.alpha) for s in grid}
    start = time.perf_counter()
    generated = generate_rows(model, bank, prompt_ids, [coefficients[s] for s, _ in plan], settings,
                              scale=steer_scale, progress=progress)
    rows = [SweepRow(s.mode, s.layer, s.strength, s.op, k, text, tokens)
            for (s, k), (tokens, text) in zip(plan, generated.rows, strict=True)]
    meta = {"seed_feature": str(graph.seed), "prompt_tokens": prompt_ids[0].tolist(),
            "layers": sorted({s.layer for s in grid if s.layer is not None}), "stop_token": generated.stop_token,
            "seconds": round(time.perf_counter() - start, 2), "generate_calls": generated.calls}
    return SteeringSweep(rows, settings, meta)


def setting_coefficients(graph: Any, setting: SweepSetting, schedule: Schedule,
                         alpha: float) -> dict[FeatureRef, float]:
    """The features one grid point steers and the coefficient of each (none for the baseline)."""
    if setting.mode == "baseline":
        return {}
    return {ref: float(coef) for ref, coef in flow_coefficients(
        graph, setting.strength, schedule=schedule, alpha=alpha, mode=setting.mode,  # type: ignore[arg-type]
        up_to_layer=setting.layer)}


@dataclass
class GeneratedRows:
    """What :func:`generate_rows` returns: ``(tokens, text)`` per row, the stop token and the
    number of ``generate`` calls."""

    rows: list[tuple[list[int], str]]
    stop_token: int | None
    calls: int


def generate_rows(
    model: HookedTransformer,
    bank: SAEBank,
    prompt_ids: torch.Tensor,
    edits: Sequence[Mapping[FeatureRef, float]],
    settings: SweepSettings,
    *,
    scale: Any = None,
    contexts: Any = None,
    seed_offset: int = 0,
    progress: bool = True,
    desc: str = "steering sweep",
    announce: bool = True,
) -> GeneratedRows:
    """Generate one continuation of ``prompt_ids`` per row of ``edits`` (``{ref: coefficient}``,
    empty for an unsteered row), ``settings.batch_size`` rows per ``generate`` call.

    Each call gets a :class:`Steerer` whose per-row coefficient vectors give every row its
    own edits (``settings.op``; rows that leave a feature alone get the neutral value, 0
    for ``add``, 1 for ``rescale``). ``torch.manual_seed(settings.seed + seed_offset + i)``
    before the i-th call; sampling, lengths and positions come from ``settings``.
    Continuations are cut after the model's stop token (EOS). With ``progress`` (and
    ``announce``) a line first says what the work will cost (:func:`generation_seconds`).
    """
    if prompt_ids.shape[-1] + settings.max_new_tokens > model.cfg.n_ctx:
        raise InvalidArgumentError(f"a prompt of {prompt_ids.shape[-1]} tokens plus max_new_tokens="
                                   f"{settings.max_new_tokens} does not fit the model's context of {model.cfg.n_ctx} "
                                   "tokens: shorten the prompt or ask for fewer tokens")
    backend = backend_of(model)
    stop_token = backend.tokenizer.eos_token_id if backend.tokenizer is not None else None
    size = settings.batch_size if settings.batched else 1
    chunks = [list(edits[i:i + size]) for i in range(0, len(edits), size)]
    neutral = 0.0 if settings.op == "add" else 1.0
    if progress and announce and chunks:
        seconds = generation_seconds(model, prompt_ids.shape[-1], len(edits), settings)
        tqdm.write(f"{desc}: {len(edits)} rows of {settings.max_new_tokens} tokens in {len(chunks)} generate "
                   f"calls, about {format_seconds(seconds)} (from two steps timed now)")
    out_rows: list[tuple[list[int], str]] = []
    for i, chunk in enumerate(tqdm(chunks, desc=desc, unit="batch", disable=not progress)):
        steerer = Steerer(model, bank, positions=settings.positions,
                          scale=scale if scale is not None else settings.scale, contexts=contexts)
        refs = list(dict.fromkeys(ref for row in chunk for ref in row))
        for ref in refs:
            values = [row.get(ref, neutral) for row in chunk]
            getattr(steerer, settings.op)(ref, values if settings.batched else values[0])
        torch.manual_seed(settings.seed + seed_offset + i)
        with steerer:
            out = backend.generate(prompt_ids.expand(len(chunk), -1), max_new_tokens=settings.max_new_tokens,
                                   do_sample=settings.do_sample, top_p=settings.top_p,
                                   temperature=settings.temperature, stop_at_eos=stop_token is not None,
                                   verbose=False)
        for tokens in out[:, prompt_ids.shape[1]:].tolist():
            if stop_token is not None and stop_token in tokens:
                tokens = tokens[:tokens.index(stop_token) + 1]
            text = backend.tokenizer.decode(tokens, skip_special_tokens=True) if backend.tokenizer is not None else ""
            out_rows.append((tokens, text))
    return GeneratedRows(out_rows, stop_token, len(chunks))


@torch.no_grad()
def generation_seconds(model: HookedTransformer, prompt_len: int, n_rows: int, settings: SweepSettings) -> float:
    """Seconds :func:`generate_rows` will take for ``n_rows`` rows, from timing two greedy steps now.

    A ``generate`` of a full batch for 2 new tokens is timed (it costs ~2/``max_new_tokens``
    of one call, warms the model up and leaves the random state alone); each call is then
    ``max_new_tokens`` such steps. Steering hooks and early stops are not counted, so it
    errs a little either way; the progress bar's own rate takes over after the first call.
    """
    size = min(settings.batch_size if settings.batched else 1, max(n_rows, 1))
    calls = -(-n_rows // size)
    probe = torch.zeros((size, prompt_len), dtype=torch.long, device=model.cfg.device)
    start = time.perf_counter()
    backend_of(model).generate(probe, max_new_tokens=2, do_sample=False, stop_at_eos=False, verbose=False)
    step = (time.perf_counter() - start) / 2
    return calls * settings.max_new_tokens * step


def format_seconds(seconds: float) -> str:
    """``"40 s"``, ``"3.5 min"`` or ``"1.2 h"``.

    >>> format_seconds(40.2), format_seconds(210), format_seconds(7300)
    ('40 s', '3.5 min', '2.0 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _prompt_tokens(model: HookedTransformer, settings: SweepSettings,
                   prompt_tokens: torch.Tensor | None) -> torch.Tensor:
    """The prompt as ``[1, pos]`` token ids on the model's device."""
    if prompt_tokens is not None:
        ids = check_tokens(torch.as_tensor(prompt_tokens).reshape(1, -1), model.cfg.d_vocab, name="prompt_tokens")
    elif settings.prompt is None:
        raise InvalidArgumentError("a sweep needs a prompt: a text in settings.prompt or prompt_tokens=")
    elif backend_of(model).tokenizer is None:
        raise InvalidArgumentError("a text prompt needs a model with a tokenizer: pass prompt_tokens= instead")
    else:
        ids = backend_of(model).tokenize(settings.prompt)
    return ids.to(model.cfg.device)

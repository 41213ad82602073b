"""A report card for steering a theme: prompting vs one feature vs its flow graph.

AxBench (arXiv 2501.17148) found that asking for a concept in the prompt beats SAE
steering. A steering result is only worth reading next to that baseline, so
:func:`steering_report_card` measures, for one theme and its seed's flow graph:

- **methods**: ``unsteered``; ``prompting`` (the unsteered model asked for the topic in
  its prompt); ``feature`` (the seed alone at its layer); the flow graph
  ``single`` (the graph's features at one layer) and ``cumulative`` (every feature
  from the graph's first layer up to one layer), each with the paper's three
  schedules: constant ``s``, exponential ``s * exp(alpha * layer)`` (alpha -0.05
  single-layer, -0.25 cumulative, as in the paper) and linear (``s`` at the span's
  first layer to 1 at its last).
- **selection**: each steered method's layer and strength are chosen on
  ``select_samples`` generations per setting (the paper's score: behavioural x
  coherence on the paper's prompt), then measured on ``samples`` fresh generations
  (other sampling seeds), so a cell is not the maximum of its own noise. Strengths
  are the coefficient at the seed's layer in ``scale`` units (``"typical"``: each
  feature's median activation); for the exponential schedule the paper's ``s`` is
  ``strength * exp(-alpha * seed_layer)`` (recorded as ``paper_strength``).
- **columns** on the paper's prompt ("I think"): the paper's score, concept
  (behavioural), fluency (coherence) and the perplexity ratio to the unsteered model
  (geometric mean of each generation's perplexity under the unsteered model over the
  unsteered generations' median); on **neutral prompts** (everyday instructions in the
  chat template; the same steering as a control): concept, fluency, instruction
  relevance and AxBench's harmonic mean of the three (per generation, then averaged).

Instruction relevance is the judge's similarity of a response with its instruction,
0 at unsteered responses to *other* instructions, 1 at unsteered responses to the same
one. Concept's on-topic anchor is the theme's labelled sentences
(:data:`~tl_featureflow.steer.judge_set.ON_TOPIC`), so concept 1 means "as on topic
as text written on the theme". All scores come from the offline judge, a proxy.

>>> harmonic([1.0, 0.5], [1.0, 0.5], [1.0, 0.0])   # one zero makes the mean zero, as in AxBench
tensor([1., 0.])
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_featureflow._files import atomic_write_json, check_header, header, read_json
from tl_featureflow.backend import ModelBackend, backend_of
from tl_featureflow.errors import CacheError, InvalidArgumentError, UnknownFeatureError
from tl_featureflow.refs import FeatureRef
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.steer.judge import perplexity_of_rows
from tl_featureflow.steer.steerer import Schedule, flow_coefficients
from tl_featureflow.steer.sweeps import (
    SweepSettings,
    format_seconds,
    generate_rows,
    generation_seconds,
    settings_from_dict,
)

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Method", "PAPER_METHODS", "CardSettings", "CardRow", "ReportCard", "steering_report_card",
           "harmonic", "QUICK_SETTINGS", "NEUTRAL_PROMPTS", "REPORT_CARD_SCHEMA_VERSION"]

REPORT_CARD_SCHEMA_VERSION = 1

#: Everyday instructions with no theme: the control prompts (instruction relevance is measured on them).
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "Tell me about your weekend.",
    "Describe a good breakfast.",
    "Give me three tips for saving money.",
    "What should I pack for a trip to the beach?",
)

#: How the prompting baseline asks for the topic: after the paper's prompt's text, and after an instruction.
PROMPTING_PREFIX = "Talk about {concept}. "
PROMPTING_SUFFIX = " Talk about {concept} in your answer."


@dataclass(frozen=True)
class Method:
    """A way of steering: ``mode`` is ``"feature"`` (the seed alone), ``"single"`` or ``"cumulative"``."""

    name: str
    mode: Literal["feature", "single", "cumulative"]
    schedule: Schedule = "constant"
    alpha: float = -0.05

    def paper_strength(self, strength: float, seed_layer: int) -> float:
        """The paper's ``s`` whose coefficient at the seed's layer is ``strength``."""
        return strength * math.exp(-self.alpha * seed_layer) if self.schedule == "exponential" else strength


PAPER_METHODS: tuple[Method, ...] = (
    Method("feature", "feature"),
    Method("single constant", "single"),
    Method("single exponential", "single", "exponential", -0.05),
    Method("single linear", "single", "linear"),
    Method("cumulative constant", "cumulative"),
    Method("cumulative exponential", "cumulative", "exponential", -0.25),
    Method("cumulative linear", "cumulative", "linear"),
)


@dataclass(frozen=True)
class CardSettings:
    """What a report card runs; defaults are the paper's sampling and the issue's 8 samples per cell."""

    prompt: str = "I think"
    neutral_prompts: tuple[str, ...] = NEUTRAL_PROMPTS
    strengths: tuple[float, ...] = (2.0, 4.0, 8.0)
    layers: tuple[int, ...] | None = None
    methods: tuple[Method, ...] = PAPER_METHODS
    select_samples: int = 2
    samples: int = 8
    neutral_samples: int = 2
    max_new_tokens: int = 36
    top_p: float | None = 0.7
    temperature: float = 1.27
    seed: int = 0
    batch_size: int = 32
    scale: str = "typical"

    def __post_init__(self) -> None:
        object.__setattr__(self, "strengths", tuple(float(s) for s in self.strengths))
        object.__setattr__(self, "neutral_prompts", tuple(self.neutral_prompts))
        object.__setattr__(self, "methods", tuple(m if isinstance(m, Method) else Method(**m) for m in self.methods))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if min(self.select_samples, self.samples, self.neutral_samples) < 1 or not self.strengths:
            raise InvalidArgumentError("a report card needs strengths and >= 1 sample of each kind")
        if len(self.neutral_prompts) < 2:
            raise InvalidArgumentError("instruction relevance needs at least 2 neutral prompts (one is the "
                                       f"off-topic anchor of another), got {len(self.neutral_prompts)}")

    def sweep(self) -> SweepSettings:
        """The generation settings as a :class:`SweepSettings` (for :func:`generate_rows`)."""
        return SweepSettings(prompt=self.prompt, max_new_tokens=self.max_new_tokens, top_p=self.top_p,
                             temperature=self.temperature, seed=self.seed, batch_size=self.batch_size,
                             scale=self.scale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CardSettings:
        return settings_from_dict(cls, data)


@dataclass
class CardRow:
    """One method's line of the card: its chosen setting and mean scores (NaN where not measured)."""

    method: str
    layer: int | None = None
    strength: float | None = None
    paper_strength: float | None = None
    n: int = 0
    score: float = math.nan
    concept: float = math.nan
    fluency: float = math.nan
    ppl_ratio: float = math.nan
    neutral_n: int = 0
    neutral_concept: float = math.nan
    neutral_fluency: float = math.nan
    instruction: float = math.nan
    harmonic: float = math.nan
    selection_score: float | None = None


@dataclass
class ReportCard:
    """A theme's report card: one :class:`CardRow` per method, every generation with its scores,
    the settings and facts of the run (seed feature, graph, seconds, generate calls)."""

    theme: str
    topic: str
    rows: list[CardRow]
    settings: CardSettings
    generations: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"ReportCard({self.theme!r}: {len(self.rows)} methods, {len(self.generations)} generations, "
                f"seed {self.meta.get('seed', '?')}; .verdict() to read it)")

    def row(self, method: str) -> CardRow:
        for row in self.rows:
            if row.method == method:
                return row
        raise InvalidArgumentError(f"the report card has no method {method!r}: it has {[r.method for r in self.rows]}")

    def best_steering(self, metric: str = "harmonic") -> CardRow:
        """The steered method (feature or flow graph) with the highest ``metric``."""
        steered = [r for r in self.rows if r.method not in ("unsteered", "prompting")]
        return max(steered, key=lambda r: -math.inf if math.isnan(getattr(r, metric)) else getattr(r, metric))

    def stderr(self, method: str, metric: str = "harmonic") -> float:
        """The standard error of a method's mean ``metric`` over its generations (``score``,
        ``concept``, ``fluency``: the paper's prompt; ``harmonic``, ``instruction``: neutral prompts)."""
        neutral = metric in ("harmonic", "instruction")
        values = [g[metric] for g in self.generations
                  if g["method"] == method and (g["prompt"] > 0) == neutral and metric in g]
        values = [v for v in values if not math.isnan(v)]
        if len(values) < 2:
            return math.nan
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))

    def verdict(self) -> str:
        """A plain sentence: where the best steering stands against prompting, with standard errors
        (a difference within one combined standard error is called level)."""
        parts = []
        for metric, where in (("harmonic", "on neutral instructions (harmonic mean)"),
                              ("score", "on the paper's prompt (behavioural x coherence)")):
            best, prompting = self.best_steering(metric), self.row("prompting")
            a, b = getattr(best, metric), getattr(prompting, metric)
            se = math.hypot(self.stderr(best.method, metric), self.stderr("prompting", metric))
            side = ("beats" if a - b > se else "is below" if b - a > se else "is level with") if not math.isnan(se) \
                else ("beats" if a > b else "is below")
            parts.append(f"{where}, the best steering ({best.method}, {a:.2f} ± {self.stderr(best.method, metric):.2f}) "
                         f"{side} prompting ({b:.2f} ± {self.stderr('prompting', metric):.2f})")
        return f"{self.theme}: " + "; ".join(parts) + "."

    def to_markdown(self) -> str:
        """The card as a Markdown table (the format of docs/results.md)."""
        head = ("| method | layer | strength | score (B x C) | concept | fluency | ppl ratio | neutral: concept "
                "| fluency | instruction | harmonic |")
        lines = [head, "|" + "---|" * 11]
        for r in self.rows:
            setting = [str(r.layer) if r.layer is not None else "-",
                       f"{r.strength:g}" if r.strength is not None else "-"]
            values = [r.score, r.concept, r.fluency, r.ppl_ratio, r.neutral_concept, r.neutral_fluency,
                      r.instruction, r.harmonic]
            lines.append("| " + " | ".join([r.method, *setting, *(_fmt(v) for v in values)]) + " |")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write the card as JSON (atomically); :meth:`load` reads it back."""
        path = Path(path)
        atomic_write_json(path, {**header("ReportCard", REPORT_CARD_SCHEMA_VERSION), "theme": self.theme,
                                 "topic": self.topic, "settings": self.settings.to_dict(), "meta": self.meta,
                                 "rows": [_json_row(asdict(r)) for r in self.rows],
                                 "generations": self.generations})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReportCard:
        path = Path(path)
        data = read_json(path, "a steering report card")
        try:
            check_header(data, "ReportCard", REPORT_CARD_SCHEMA_VERSION, path)
            rows = [CardRow(**{k: (math.nan if v is None and isinstance(getattr(CardRow, k, None), float) else v)
                               for k, v in r.items()}) for r in data["rows"]]
            return cls(data["theme"], data["topic"], rows, CardSettings.from_dict(data["settings"]),
                       data["generations"], data["meta"])
        except (KeyError, TypeError, ValueError, InvalidArgumentError) as exc:
            raise CacheError(f"{path} is not a saved report card ({exc})") from exc


def harmonic(*scores: Sequence[float] | Tensor) -> Float[Tensor, " n"]:
    """Per generation, the harmonic mean of its scores in [0, 1] (0 when any is 0), as AxBench."""
    stacked = torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in scores])
    out = stacked.shape[0] / (1.0 / stacked.clamp_min(1e-12)).sum(0)
    return torch.where((stacked <= 0).any(0), torch.zeros_like(out), out)


@dataclass(frozen=True)
class _Plan:
    """One generation to make: its method, setting, prompt (index into the card's prompts) and sample."""

    method: str
    layer: int | None
    strength: float | None
    prompt: int
    sample: int
    edits: dict[FeatureRef, float]


#: :func:`steering_report_card`'s ``quick=True``: one strength, 1 selection sample per setting,
#: 4 samples of 24 tokens for the chosen settings, 1 per neutral prompt.
QUICK_SETTINGS = CardSettings(strengths=(4.0,), select_samples=1, samples=4, neutral_samples=1, max_new_tokens=24)


def steering_report_card(
    model: HookedTransformer,
    bank: SAEBank,
    graph: Any,
    theme: Any,
    *,
    judge: Any,
    settings: CardSettings | None = None,
    contexts: Any = None,
    on_topic: Sequence[str] | None = None,
    progress: bool = True,
    quick: bool = False,
    **overrides: Any,
) -> ReportCard:
    """Measure the report card of steering ``theme`` with ``graph`` (see the module docs).

    ``theme``: a :class:`~tl_featureflow.steer.themes.Theme` (or its name in ``THEMES``);
    ``judge``: an :class:`~tl_featureflow.steer.judge.OfflineJudge` over the unsteered
    model; ``contexts``: the bank's TopContexts (for ``scale="typical"``; default: cached
    :func:`~tl_featureflow.flow.contexts.feature_contexts`); ``on_topic``: the concept's
    on-topic anchor texts (default: the theme's labelled sentences when it has them).
    Keyword arguments named like :class:`CardSettings` fields override ``settings``.
    ``quick=True`` starts from :data:`QUICK_SETTINGS` (one strength, fewer and shorter
    samples: minutes instead of the better part of an hour on 2 CPU cores for SmolLM2),
    for a first look; its standard errors are wider.
    """
    from tl_featureflow.steer.judge_set import ON_TOPIC
    from tl_featureflow.steer.themes import THEMES

    if isinstance(theme, str):
        if theme not in THEMES:
            raise InvalidArgumentError(f"unknown theme {theme!r}: expected one of {sorted(THEMES)} or a Theme")
        theme = THEMES[theme]
    if backend_of(model).tokenizer is None:
        raise InvalidArgumentError("a report card needs a model with a tokenizer (it compares text prompts)")
    unknown = sorted(set(overrides) - {f.name for f in fields(CardSettings)})
    if unknown:
        raise InvalidArgumentError(f"steering_report_card got unknown settings {unknown}: expected CardSettings fields")
    if quick and settings is not None:
        raise InvalidArgumentError("steering_report_card got both quick=True and settings: pass one")
    settings = replace(settings or (QUICK_SETTINGS if quick else CardSettings()), **overrides)
    on_topic = list(on_topic) if on_topic is not None else list(ON_TOPIC.get(theme.name, ()))
    graph_layers = sorted({n.ref.layer for n in graph.nodes})
    layers = [x for x in (settings.layers or graph_layers) if x in graph_layers]
    if not layers:
        raise UnknownFeatureError(f"none of the layers {settings.layers} is in the flow graph of {graph.seed} "
                                  f"(its layers: {graph_layers})")
    start = time.perf_counter()
    prompts = [backend_of(model).tokenize(settings.prompt)] + [_chat(model, p) for p in settings.neutral_prompts]
    asked = [backend_of(model).tokenize(PROMPTING_PREFIX.format(concept=theme.name) + settings.prompt)]
    asked += [_chat(model, p + PROMPTING_SUFFIX.format(concept=theme.name)) for p in settings.neutral_prompts]
    gen = settings.sweep()
    calls = 0

    def run(prompt: Tensor, plans: list[_Plan], offset: int, desc: str) -> list[tuple[list[int], str]]:
        nonlocal calls
        out = generate_rows(model, bank, prompt.to(model.cfg.device), [p.edits for p in plans], gen,
                            contexts=contexts, seed_offset=offset, progress=progress, desc=desc, announce=False)
        calls += out.calls
        return out.rows

    # 1. selection: every method x layer x strength, select_samples each, on the paper's prompt
    candidates = [(m, layer, s) for m in settings.methods for layer, s in _grid(m, graph, layers, settings)]
    select = [_Plan("unsteered", None, None, 0, k, {}) for k in range(settings.select_samples)]
    select += [_Plan(m.name, layer, s, 0, k, _edits(m, graph, layer, s))
               for m, layer, s in candidates for k in range(settings.select_samples)]
    if progress:                 # what the whole card costs, before any of it runs
        per_prompt_n = [settings.samples] + [settings.neutral_samples] * len(settings.neutral_prompts)
        runs = [len(select)] + [n * (len(settings.methods) + 1) for n in per_prompt_n] + per_prompt_n
        one_call = generation_seconds(model, prompts[0].shape[-1], gen.batch_size, gen)
        size = gen.batch_size if gen.batched else 1
        tqdm.write(f"report card for {theme.name}: {sum(runs)} generations of up to {settings.max_new_tokens} "
                   f"tokens, about {format_seconds(one_call * sum(-(-n // size) for n in runs))} "
                   "(from two steps timed now)")
    rows = run(prompts[0], select, 0, f"{theme.name}: choosing settings")
    scores = _score(model, judge, theme.description, prompts[0], rows, [p.method == "unsteered" for p in select],
                    on_topic)
    chosen: dict[str, tuple[int | None, float, float]] = {}
    selection = []
    n_sel = settings.select_samples
    for c, (m, layer, s) in enumerate(candidates):      # candidate c's rows follow the unsteered ones, in order
        value = float(scores["score"][n_sel * (c + 1):n_sel * (c + 2)].mean())
        selection.append({"method": m.name, "layer": layer, "strength": s, "score": round(value, 4)})
        if m.name not in chosen or value > chosen[m.name][2]:
            chosen[m.name] = (layer, s, value)

    # 2. measurement: the chosen settings on fresh samples, paper's prompt and neutral prompts
    by_name = {m.name: m for m in settings.methods}
    measured: dict[str, tuple[int | None, float | None, dict[FeatureRef, float]]] = {"unsteered": (None, None, {})}
    generations: list[dict[str, Any]] = []
    card_rows = {name: CardRow(name) for name in ["unsteered", "prompting", *chosen]}
    for name, (layer, s, value) in chosen.items():
        measured[name] = (layer, s, _edits(by_name[name], graph, layer, s))
        card_rows[name].layer, card_rows[name].strength = layer, s
        card_rows[name].paper_strength = by_name[name].paper_strength(s, graph.seed.layer)
        card_rows[name].selection_score = value
    per_prompt: list[dict[str, Any]] = []
    for j, prompt in enumerate(prompts):
        n = settings.samples if j == 0 else settings.neutral_samples
        plans = [_Plan(name, layer, s, j, k, edits) for name, (layer, s, edits) in measured.items()
                 for k in range(n)]
        rows = run(prompt, plans, 1000 * (j + 1), f"{theme.name}: prompt {j + 1}/{len(prompts)}")
        ask = [_Plan("prompting", None, None, j, k, {}) for k in range(n)]   # same sampling seed as the others
        rows += run(asked[j], ask, 1000 * (j + 1), f"{theme.name}: prompting {j + 1}/{len(prompts)}")
        per_prompt.append({"plans": plans + ask, "rows": rows})
    neutral_base = _unsteered_texts(per_prompt[1:])
    for j, block in enumerate(per_prompt):
        block["scores"] = _score(model, judge, theme.description, prompts[j], block["rows"],
                                 [p.method == "unsteered" for p in block["plans"]], on_topic,
                                 neutral_reference=neutral_base if j > 0 else None)
    anchors = _instruction(judge, settings.neutral_prompts, per_prompt[1:])
    for j, block in enumerate(per_prompt):
        for i, (plan, (_, text)) in enumerate(zip(block["plans"], block["rows"], strict=True)):
            generations.append({"method": plan.method, "prompt": j, "sample": plan.sample, "text": text,
                                **{k: float(v[i]) for k, v in block["scores"].items()}})
    for row in card_rows.values():
        _fill(row, [g for g in generations if g["method"] == row.method])
    meta = {"seed_feature": str(graph.seed), "graph_nodes": len(graph.nodes), "graph_span": list(graph.span),
            "layers": layers, "seconds": round(time.perf_counter() - start, 1), "generate_calls": calls,
            "prompts": [settings.prompt, *settings.neutral_prompts], "on_topic_anchor": len(on_topic),
            "selected_on": "score (behavioural x coherence) on the paper's prompt, other sampling seeds",
            "instruction_anchors": anchors, "selection": selection}
    return ReportCard(theme.name, theme.description, list(card_rows.values()), settings, generations, meta)


def _grid(method: Method, graph: Any, layers: list[int], settings: CardSettings) -> list[tuple[int, float]]:
    """The (layer, strength) points a method is chosen from (the feature alone: its own layer)."""
    points = [graph.seed.layer] if method.mode == "feature" else layers
    if method.mode == "cumulative":
        points = [x for x in points if x >= graph.seed.layer] or points
    return [(layer, s) for layer in points for s in settings.strengths]


def _edits(method: Method, graph: Any, layer: int | None, strength: float | None) -> dict[FeatureRef, float]:
    """The coefficients one method applies at one (layer, strength)."""
    assert layer is not None and strength is not None
    if method.mode == "feature":
        return {graph.seed: float(strength)}
    s = method.paper_strength(strength, graph.seed.layer)
    return {ref: float(c) for ref, c in flow_coefficients(graph, s, schedule=method.schedule, alpha=method.alpha,
                                                          mode=method.mode, up_to_layer=layer)}


def _chat(model: HookedTransformer | ModelBackend, instruction: str) -> Tensor:
    """An instruction as the model's chat prompt (plain text when the tokenizer has no template)."""
    tok = backend_of(model).tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                       add_generation_prompt=True)
        return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    return backend_of(model).tokenize(instruction)


def _unsteered_texts(blocks: list[dict[str, Any]]) -> list[str]:
    return [text for b in blocks for p, (_, text) in zip(b["plans"], b["rows"], strict=True)
            if p.method == "unsteered"]


def _score(model: HookedTransformer, judge: Any, topic: str, prompt: Tensor, rows: list[tuple[list[int], str]],
           unsteered: list[bool], on_topic: list[str], neutral_reference: list[str] | None = None,
           ) -> dict[str, Tensor]:
    """Concept, fluency, paper score and perplexity ratio of each row, the judge calibrated on the
    unsteered rows of this prompt (``neutral_reference``: more unsteered texts for the concept's anchor)."""
    tokens = [t for t, _ in rows]
    texts = [t for _, t in rows]
    ppl = perplexity_of_rows(model, prompt.cpu(), tokens, backend_of(model).tokenizer.eos_token_id)
    base = [i for i, u in enumerate(unsteered) if u]
    if not base:
        raise InvalidArgumentError("scoring needs unsteered rows of the same prompt")
    off = [texts[i] for i in base] + list(neutral_reference or [])
    judge.calibrate(topic, off_topic=off, on_topic=on_topic or None, reference_ppl=ppl[base],
                    reference_tokens=[tokens[i] for i in base])
    concept, fluency = judge.behavioural(texts), judge.coherence(ppl, tokens)
    ppl_ref = float(ppl[base].median())
    return {"concept": concept, "fluency": fluency, "score": concept * fluency, "ppl": ppl,
            "ppl_ratio": ppl / ppl_ref}


def _instruction(judge: Any, instructions: Sequence[str], blocks: list[dict[str, Any]]) -> dict[str, float]:
    """Add instruction relevance and the harmonic mean to each neutral prompt's scores (in place);
    returns the two similarity anchors (unsteered responses to other / to their own instructions)."""
    emb = judge.embedder.encode(list(instructions))
    matched, mismatched = [], []
    sims = []
    for j, block in enumerate(blocks):
        resp = judge.embedder.encode([text for _, text in block["rows"]])
        sim = resp @ emb.T                                            # [rows, instructions]
        sims.append(sim[:, j])
        base = [i for i, p in enumerate(block["plans"]) if p.method == "unsteered"]
        matched += sim[base, j].tolist()
        mismatched += sim[base][:, [k for k in range(len(instructions)) if k != j]].flatten().tolist()
    lo, hi = sum(mismatched) / len(mismatched), sum(matched) / len(matched)
    calibrated = hi > lo + 1e-3
    if not calibrated:
        warnings.warn(f"the unsteered responses are no closer to their own instructions ({hi:.3f}) than to the "
                      f"others ({lo:.3f}): instruction relevance (and the harmonic mean) is NaN", stacklevel=3)
    for block, sim in zip(blocks, sims, strict=True):
        inst = ((sim - lo) / (hi - lo)).clamp(0, 1) if calibrated else torch.full_like(sim, math.nan)
        block["scores"]["instruction"] = inst
        block["scores"]["harmonic"] = harmonic(block["scores"]["concept"], block["scores"]["fluency"], inst)
    return {"other_instructions": round(lo, 4), "own_instruction": round(hi, 4)}


def _fill(row: CardRow, gens: list[dict[str, Any]]) -> None:
    """A method's means over its measured generations (paper prompt: prompt 0; neutral: the rest)."""
    paper = [g for g in gens if g["prompt"] == 0]
    neutral = [g for g in gens if g["prompt"] > 0]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(g[key] for g in rows) / len(rows) if rows else math.nan

    row.n, row.neutral_n = len(paper), len(neutral)
    row.score, row.concept, row.fluency = mean(paper, "score"), mean(paper, "concept"), mean(paper, "fluency")
    if paper:
        row.ppl_ratio = math.exp(sum(math.log(g["ppl_ratio"]) for g in paper) / len(paper))
    row.neutral_concept, row.neutral_fluency = mean(neutral, "concept"), mean(neutral, "fluency")
    row.instruction, row.harmonic = mean(neutral, "instruction"), mean(neutral, "harmonic")


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """NaN as null (strict JSON)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}

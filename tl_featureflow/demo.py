"""The end-to-end demo behind ``featureflow demo``: themes -> flow graphs -> validation -> steering -> report.

:func:`run_demo` works on any model with a tokenizer and any bank; the CLI calls it
with the embedded SmolLM2 and its quick bank. Everything it computes lands in a run
folder (see :mod:`tl_featureflow.viz.html`), and the validation result is reused
when the same bank, texts and settings are asked for again, so a second run costs
the steering's generation time plus a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tl_featureflow.errors import FeatureFlowError, InvalidArgumentError
from tl_featureflow.rundir import RunDir
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.steer.seeds import pick_seed, seed_layer

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["run_demo", "readme_block", "README_MARKERS"]

#: The README's demo block lies between these lines (written by ``make docs-outputs``).
README_MARKERS = ("<!-- demo-run: start (make docs-outputs writes this from docs/demo-run.json) -->",
                  "<!-- demo-run: end -->")


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_demo(
    model: HookedTransformer,
    bank: SAEBank,
    out: str | Path,
    *,
    themes: Sequence[str] = ("religion", "war"),
    texts: torch.Tensor | None = None,
    context_tokens: torch.Tensor | None = None,
    n_texts: int = 2,
    strengths: Sequence[float] = (2.0, 4.0),
    samples: int = 2,
    max_new_tokens: int = 36,
    prompt: str = "I think",
    judge: Any | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Path:
    """Run the demo into ``out`` and return the report's path.

    ``texts``: held-out token rows for validation (default: the offline corpus's
    held-out split, ``n_texts`` rows). ``context_tokens``: the token rows the features'
    top contexts (their labels and cards) are read from (default: the held-out split's
    first rows, :func:`~tl_featureflow.flow.contexts.feature_contexts`, cached with the
    bank). ``judge``: an :class:`OfflineJudge` (default: one with the all-MiniLM-L6-v2
    embedder over ``model``).
    """
    from tl_featureflow.flow.contexts import feature_contexts
    from tl_featureflow.flow.tracer import FlowTracer
    from tl_featureflow.steer.judge import OfflineJudge
    from tl_featureflow.steer.themes import THEMES
    from tl_featureflow.viz.html import report_from_dir, versions

    unknown = [t for t in themes if t not in THEMES]
    if unknown:
        raise InvalidArgumentError(f"unknown themes {unknown}: expected some of {sorted(THEMES)}")
    if model.tokenizer is None:
        raise InvalidArgumentError("the demo needs a model with a tokenizer")
    out = RunDir(out)
    start = time.perf_counter()
    log("reading what every feature fires on (top contexts, cached with the bank)...")
    contexts = feature_contexts(model, bank, context_tokens, progress=progress)
    tracer = FlowTracer(bank, model, contexts=contexts)
    judge = judge or OfflineJudge(model)
    layer = seed_layer(bank)
    summary: list[str] = []

    def say(line: str) -> None:
        summary.append(line)
        log(line)

    seeds, graphs = _trace_seeds(model, bank, tracer, themes, layer, out, say, judge, progress)  # 1. seeds, graphs
    _cards(tracer, graphs, out)
    if texts is None:
        from tl_featureflow.saes.corpus import load_corpus

        texts = load_corpus(model.tokenizer, "heldout", progress=progress).tokens[:n_texts]
    val_layers = [layer] + ([layer + 1] if ("res", layer + 1) in bank else [])
    reused = _validation(model, bank, tracer, texts, val_layers, out, say, log, progress)   # 2. causal check
    scale = _steering_scale(graphs, contexts, bank)
    _steering(model, bank, graphs, judge, prompt, strengths, samples, max_new_tokens, scale, contexts, out, say,
              progress)                                                                      # 3. steering
    settings = {"model": model.cfg.model_name, "bank": bank.describe(), "bank_preset": bank.metadata.get("preset"),
                "training_version": bank.metadata.get("training_version"),
                "training_tokens": bank.metadata.get("training_tokens"), "cpus": os.cpu_count(),
                "validation_reused": reused,
                "themes": list(themes), "seed_layer": layer, "validation_layers": val_layers,
                "validation_texts": int(len(texts)), "strengths": list(strengths), "samples": samples,
                "max_new_tokens": max_new_tokens, "prompt": prompt, "scale": scale,
                "context_tokens": contexts.n_tokens,
                "seconds": round(time.perf_counter() - start, 1), "versions": versions()}
    out.write_run({"title": "tl_featureflow demo", "summary": summary, "seeds": seeds,
                   "settings": settings})
    path = report_from_dir(out.root)                                                         # 4. the report
    log(f"report: {path.resolve()} ({time.perf_counter() - start:.0f} s)")
    return path


def _trace_seeds(model: HookedTransformer, bank: SAEBank, tracer: Any, themes: Sequence[str], layer: int, out: RunDir,
                 say: Callable[[str], None], judge: Any,
                 progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """A seed feature per theme (re-ranked by a steering probe) and its flow graph (saved under ``out/graphs``)."""
    from tl_featureflow.steer.themes import THEMES

    seeds: dict[str, dict[str, Any]] = {}
    graphs = {}
    for theme in themes:
        info, graph = pick_seed(model, bank, tracer, THEMES[theme], layer, judge=judge, probe_samples=4,
                                progress=progress)
        graph.save(out.graph(theme))
        seeds[theme] = {**info, "graph_nodes": len(graph.nodes), "span": list(graph.span),
                        "logit_lens": [t for t, _ in tracer.labels.logit_lens(graph.seed, k=6)]}
        graphs[theme] = graph
        say(f"{theme}: seed {graph.seed} (fires on {graph.node(graph.seed).label}), flow graph of "
            f"{len(graph.nodes)} features over layers {graph.span[0]}-{graph.span[1]}")
    return seeds, graphs


def _cards(tracer: Any, graphs: dict[str, Any], out: RunDir) -> None:
    """A card for every feature of the drawn graphs (``out/cards.json``, read by the report)."""
    from tl_featureflow.flow.cards import build_cards, save_cards

    refs = sorted({node.ref for graph in graphs.values() for node in graph.nodes})
    save_cards(build_cards(refs, tracer), out.cards)


def _validation(model: HookedTransformer, bank: SAEBank, tracer: Any, texts: torch.Tensor, layers: list[int],
                out: RunDir, say: Callable[[str], None], log: Callable[[str], None], progress: bool) -> bool:
    """The deactivation experiment on held-out text, reused from ``out`` when bank, texts and layers match
    (then True)."""
    from tl_featureflow.causal.experiment import validate
    from tl_featureflow.causal.results import ValidationReport

    key = _fingerprint(bank.fingerprint(), texts.tolist(), layers)
    val_path = out.validation
    report = None
    reused = False
    if val_path.is_file():
        try:
            cached = ValidationReport.load(val_path)
            report = cached if cached.meta.get("demo_key") == key else None
        except FeatureFlowError:
            report = None
    if report is None:
        log(f"validating on {len(texts)} held-out texts at layers {layers}...")
        report = validate(tracer, model, texts, layers=layers, methods=("top1", "random", "exhaustive"),
                          r=[0.0, -1.0, 0.5], loss_samples=2, progress=progress)
        report.meta["demo_key"] = key
        report.save(val_path)
    else:
        reused = True
        log("validation: reusing the saved result (same bank, texts and layers)")
    for method, row in report.summary().items():
        say(f"validation {method}: success {row['success_rate']:.0%}, activation change "
            f"{row['activation_change']:.2f} (n={row['n']})")
    return reused


def readme_block(run: dict[str, Any]) -> str:
    """The README's demo block (between :data:`README_MARKERS`) for a demo's ``run.json``.

    >>> run = {"summary": ["religion: seed 14/res/8 ..."], "settings": {"seconds": 216.0, "cpus": 2,
    ...        "validation_reused": True, "training_version": 5, "bank_preset": "quick", "training_tokens": 393216}}
    >>> print(readme_block(run))
    With the bank cached, a run here printed (216 s on 2 CPU cores, validation reused, the version-5 quick bank of 393k tokens):
    <BLANKLINE>
    ```
    religion: seed 14/res/8 ...
    report: featureflow-out/demo/report.html
    ```
    """
    s = run.get("settings", {})
    tokens = s.get("training_tokens")
    facts = [f"{s.get('seconds', 0):.0f} s on {s.get('cpus')} CPU cores"]
    facts += ["validation reused"] if s.get("validation_reused") else []
    bank = f"the version-{s.get('training_version')} {s.get('bank_preset')} bank"
    facts.append(bank + (f" of {tokens / 1000:.0f}k tokens" if tokens else ""))
    lines = [*run.get("summary", []), "report: featureflow-out/demo/report.html"]
    return f"With the bank cached, a run here printed ({', '.join(facts)}):\n\n```\n" + "\n".join(lines) + "\n```"


def _steering_scale(graphs: dict[str, Any], contexts: Any, bank: SAEBank) -> str:
    """``"typical"`` (each feature's median activation) when every graph feature fired in the contexts;
    else the JumpReLU ``"threshold"``, else ``"unit"`` (tiny or untrained banks)."""
    from tl_featureflow.steer.steerer import typical_activation

    refs = {node.ref for graph in graphs.values() for node in graph.nodes}
    if all(ref.key in contexts and typical_activation(contexts, ref) > 0 for ref in refs):
        return "typical"
    return "threshold" if all(getattr(sae, "threshold", None) is not None for sae in bank.values()) else "unit"


def _steering(model: HookedTransformer, bank: SAEBank, graphs: dict[str, Any], judge: Any | None, prompt: str,
              strengths: Sequence[float], samples: int, max_new_tokens: int, scale: str, contexts: Any, out: RunDir,
              say: Callable[[str], None], progress: bool) -> None:
    """Promote each theme along its flow graph, score with the offline judge, save the sweeps; then a
    report card per theme (prompting vs the seed alone vs the flow graph, ``out/report_cards``)."""
    from tl_featureflow.steer.report_card import CardSettings, steering_report_card
    from tl_featureflow.steer.sweeps import SweepSettings, steering_sweep
    from tl_featureflow.steer.themes import THEMES

    for theme, graph in graphs.items():
        graph_layers = sorted({n.ref.layer for n in graph.nodes})
        layers = tuple(sorted({graph.seed.layer, graph_layers[-1]}))
        settings = SweepSettings(prompt=prompt, strengths=tuple(strengths), layers=layers, samples=samples,
                                 scale=scale, max_new_tokens=max_new_tokens, batch_size=32)
        sweep = steering_sweep(model, bank, graph, settings, progress=progress)
        sweep.score(judge, THEMES[theme].description)
        sweep.save(out.sweep(f"promote-{theme}"))
        base = sum(r.scores["score"] for r in sweep.baseline()) / max(len(sweep.baseline()), 1)
        for mode in ("single", "cumulative"):
            setting, value = sweep.best(mode=mode)
            say(f"steering {theme}, {mode}: best at layer {setting.layer}, strength {setting.strength:g}: "
                f"score {value:.2f} (unsteered {base:.2f})")
        card_settings = CardSettings(prompt=prompt, strengths=(2.0, 4.0), layers=layers, select_samples=1,
                                     samples=2 * samples, neutral_samples=1, max_new_tokens=max_new_tokens,
                                     scale=scale)
        with warnings.catch_warnings(record=True) as caught:    # shown in the summary, not lost on stderr
            warnings.simplefilter("always")
            card = steering_report_card(model, bank, graph, THEMES[theme], judge=judge, settings=card_settings,
                                        contexts=contexts, progress=progress)
        card.save(out.report_card(theme))
        say(f"report card: {card.verdict()}")
        for warning in caught:
            say(f"report card note ({theme}): {warning.message}")

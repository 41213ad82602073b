"""Steering on the embedded SmolLM2 with its quick bank, measured against prompting (issue 16).

    .venv/bin/python demos/steer_smollm2.py [--samples 8] [--themes religion war love programming]
                                            [--out featureflow-out/steering]

For each theme of ``tl_featureflow.steer.themes.THEMES``:

1. **Seed**: the layer-14 res candidates of ``theme_features`` (theme vs neutral contrast,
   then contexts on theme), re-ranked by a steering probe (each steered alone at 4
   typical activations, 4 samples of 24 tokens; ``probe_seeds``); the first whose flow
   graph has at least 3 features.
2. **Report card** (``steering_report_card``): unsteered, prompting ("Talk about
   <theme>."), the seed alone, the flow graph single-layer and cumulative with the
   constant, exponential (alpha -0.05 / -0.25) and linear schedules; each method's layer
   and strength (1, 2, 4, 8 typical activations at the seed's layer) chosen on 2 samples
   per setting, then measured on ``--samples`` fresh samples of the paper's prompt
   ("I think", 36 tokens) and 2 samples on each of 4 neutral instructions.

Then suppression of religion (``rescale``, r in 0, -1, -2, -4, -8, -16, single-layer and
cumulative at the seed's layer and the graph's last layer), prompt "I think that the
biggest problem of the church today is", 96 new tokens, ``--samples`` per setting.

The paper's sampling (top_p 0.7, temperature 1.27), fixed seeds. Scores from the offline
judge (a proxy). Writes ``results.md``, the cards and the sweep under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tl_featureflow as ff
from tl_featureflow._files import atomic_write_text
from tl_featureflow.flow.contexts import feature_contexts
from tl_featureflow.steer.judge import OfflineJudge
from tl_featureflow.steer.report_card import CardSettings, ReportCard, steering_report_card
from tl_featureflow.steer.seeds import pick_seed
from tl_featureflow.steer.sweeps import SteeringSweep, steering_sweep
from tl_featureflow.steer.themes import THEMES

SUPPRESS = "religion"
SUPPRESS_PROMPT = "I think that the biggest problem of the church today is"
RS = (0.0, -1.0, -2.0, -4.0, -8.0, -16.0)


def probe_table(info: dict) -> list[str]:
    lines = ["| candidate | probe score | behavioural | coherence |", "|---|---|---|---|"]
    lines += [f"| {p['feature']}{' (chosen)' if p['feature'] == info['feature'] else ''} | {p['score']:.2f} | "
              f"{p['behavioural']:.2f} | {p['coherence']:.2f} |" for p in info.get("probe", [])]
    return lines


def examples(card: ReportCard, n_chars: int = 150) -> list[str]:
    out = []
    for method in dict.fromkeys(("unsteered", "prompting", "feature", card.best_steering("score").method)):
        rows = [g for g in card.generations if g["method"] == method and g["prompt"] == 0]
        best = max(rows, key=lambda g: g["score"])
        out.append(f"- {method} (paper prompt, best of {len(rows)}): {best['text'][:n_chars]!r}")
    return out


def suppression_table(sweep: SteeringSweep) -> list[str]:
    summary, b, c = sweep.summary(), sweep.summary("behavioural"), sweep.summary("coherence")
    lines = ["| mode | layer | " + " | ".join(f"r={r:g}" for r in RS) + " |", "|---|---|" + "---|" * len(RS)]
    base = next(k for k in summary if k.mode == "baseline")
    lines.append(f"| unsteered | - | {summary[base]:.2f} (B {b[base]:.2f}, C {c[base]:.2f}) " + "| " * (len(RS) - 1)
                 + "|")
    for mode in ("single", "cumulative"):
        for layer in sweep.meta["layers"]:
            keys = [next(k for k in summary if k.mode == mode and k.layer == layer and k.strength == r) for r in RS]
            lines.append(f"| {mode} | {layer} | " + " | ".join(f"{summary[k]:.2f} ({b[k]:.2f}/{c[k]:.2f})"
                                                            for k in keys) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--themes", nargs="+", default=["religion", "war", "love", "programming"])
    parser.add_argument("--layer", type=int, default=14, help="layer of the seed features")
    parser.add_argument("--no-suppression", action="store_true")
    parser.add_argument("--out", default="featureflow-out/steering")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    model = ff.load_embedded_model()
    bank = ff.load_embedded_bank("quick", model=model)
    contexts = feature_contexts(model, bank)
    tracer = ff.FlowTracer(bank, model, contexts=contexts)
    judge = OfflineJudge(model)
    settings = CardSettings(strengths=(1.0, 2.0, 4.0, 8.0), samples=args.samples)
    report = [f"Command: `.venv/bin/python demos/steer_smollm2.py --samples {args.samples}`; bank "
              f"{bank.metadata.get('preset')} ({bank.fingerprint()[:12]})."]
    graphs = {}
    for theme in args.themes:
        t0 = time.perf_counter()
        info, graph = pick_seed(model, bank, tracer, THEMES[theme], args.layer, judge=judge, probe_samples=4,
                                progress=True)
        graphs[theme] = graph
        card = steering_report_card(model, bank, graph, theme, judge=judge, settings=settings, contexts=contexts)
        card.meta["seed"] = info
        card.save(out / "cards" / f"{theme}.json")
        report += [f"\n### {theme}: seed {graph.seed} ({graph.node(graph.seed).label}), flow graph of "
                   f"{len(graph.nodes)} features, layers {graph.span[0]}-{graph.span[1]} "
                   f"({time.perf_counter() - t0:.0f} s, {card.meta['generate_calls']} generate calls)\n",
                   "Seed probe (steered alone at 4 typical activations, 4 samples):\n", *probe_table(info), "",
                   f"Report card ({args.samples} samples per cell on \"I think\"; 4 neutral instructions x "
                   f"{settings.neutral_samples}):\n", card.to_markdown(), "", card.verdict(), "", *examples(card)]
        print("\n".join(report[-12:]), flush=True)
    if not args.no_suppression:
        info, graph = (None, graphs[SUPPRESS]) if SUPPRESS in graphs else pick_seed(
            model, bank, tracer, THEMES[SUPPRESS], args.layer, judge=judge, probe_samples=4)
        sweep = steering_sweep(model, bank, graph, prompt=SUPPRESS_PROMPT, strengths=RS, op="rescale",
                               layers=sorted({graph.seed.layer, graph.span[1]}), samples=args.samples,
                               max_new_tokens=96, seed=0, batch_size=32)
        sweep.score(judge, THEMES[SUPPRESS].description, suppress=True, on_topic=None)
        sweep.save(out / f"suppress-{SUPPRESS}.json")
        report += [f"\n### Suppression of {SUPPRESS} (seed {graph.seed}, {sweep.meta['seconds']:.0f} s)\n",
                   "(1 - behavioural) x coherence, behavioural / coherence in brackets; columns are r.\n",
                   *suppression_table(sweep)]
        print("\n".join(report[-12:]), flush=True)
    report.append(f"\nfinished in {time.perf_counter() - start:.0f} s")
    atomic_write_text(out / "results.md", "\n".join(report) + "\n")
    print(f"\nfinished in {time.perf_counter() - start:.0f} s; results in {out}/results.md")


if __name__ == "__main__":
    main()

"""Steering along flow graphs on the embedded SmolLM2 with its quick bank (method section 6).

    .venv/bin/python demos/steer_smollm2.py [--samples 2] [--out featureflow-out/steering]

For each theme of ``tl_featureflow.steer.themes.THEMES`` the seed is the layer-14 res
feature that best separates the theme's example texts from neutral text (with a flow
graph of at least 3 features); its flow graph is traced with the default thresholds.

- Promotion: ``add`` along the graph, single-layer vs cumulative, at every layer of
  the graph, strengths in units of each feature's JumpReLU threshold (SAE Match
  folding, as in the paper), prompt "I think", 36 new tokens.
- Suppression of "religion": ``rescale`` with r in 0, -1, -2, -4 along the graph,
  prompt "I think that the biggest problem of the church today is", 64 new tokens.

The paper's sampling (top_p 0.7, temperature 1.27), fixed seeds, ``samples`` generations
per setting. Scored by the offline judge (``tl_featureflow.steer.judge``), a proxy for
the paper's gpt-4o-mini. Prints Markdown tables and example generations; each sweep is
saved as JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tl_featureflow as ff
from tl_featureflow.steer.judge import OfflineJudge
from tl_featureflow.steer.sweeps import SteeringSweep, steering_sweep
from tl_featureflow.steer.themes import THEMES, theme_features

PROMOTE = ("religion", "war", "love", "programming")
SUPPRESS = "religion"


def pick_seed(model, bank, tracer, theme: str, layer: int):  # type: ignore[no-untyped-def]
    for feature in theme_features(model, bank, THEMES[theme].texts, layer=layer, k=8):
        graph = tracer.trace(feature.ref)
        if len(graph.nodes) >= 3:
            return feature, graph
    raise SystemExit(f"no layer-{layer} feature of theme {theme!r} has a flow graph of 3 or more features")


def table(sweep: SteeringSweep, strengths: list[float]) -> list[str]:
    summary = sweep.summary()
    behaviour = sweep.summary("behavioural")
    coherence = sweep.summary("coherence")
    name = "r" if sweep.settings.op == "rescale" else "s"
    lines = ["| mode | layer | " + " | ".join(f"{name}={s:g}" for s in strengths) + " |",
             "|---|---|" + "---|" * len(strengths)]
    base = next(k for k in summary if k.mode == "baseline")
    lines.append(f"| baseline | - | {summary[base]:.2f} (B {behaviour[base]:.2f}, C {coherence[base]:.2f}) "
                 + "| " * (len(strengths) - 1) + "|")
    for mode in ("single", "cumulative"):
        for layer in sweep.meta["layers"]:
            cells = []
            for s in strengths:
                key = next(k for k in summary if k.mode == mode and k.layer == layer and k.strength == s)
                cells.append(f"{summary[key]:.2f} ({behaviour[key]:.2f}/{coherence[key]:.2f})")
            lines.append(f"| {mode} | {layer} | " + " | ".join(cells) + " |")
    return lines


def examples(sweep: SteeringSweep, n_chars: int = 160) -> list[str]:
    out = []
    base = sweep.baseline()[0]
    out.append(f"- baseline: {base.text[:n_chars]!r}")
    for mode in ("single", "cumulative"):
        setting, value = sweep.best(mode=mode)
        row = max((r for r in sweep.rows if r.setting == setting), key=lambda r: r.scores["score"])
        out.append(f"- best {mode} (layer {setting.layer}, {setting.op} {setting.strength:g}, mean score "
                   f"{value:.2f}): {row.text[:n_chars]!r}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--layer", type=int, default=14, help="layer of the seed features")
    parser.add_argument("--out", default="featureflow-out/steering")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    model = ff.load_embedded_model()
    bank = ff.load_embedded_bank("quick", model=model)
    tracer = ff.FlowTracer(bank, model)
    judge = OfflineJudge(model)
    report: list[str] = []
    strengths = [4.0, 8.0, 16.0, 32.0]
    for theme in PROMOTE:
        feature, graph = pick_seed(model, bank, tracer, theme, args.layer)
        sweep = steering_sweep(model, bank, graph, prompt="I think", strengths=strengths, samples=args.samples,
                               scale="threshold", max_new_tokens=36, seed=0)
        sweep.score(judge, THEMES[theme].description)
        sweep.save(out / f"promote-{theme}.json")
        report += [f"\n### Promotion: {theme} (seed {feature.ref}, flow graph of {len(graph.nodes)} features, "
                   f"layers {graph.span[0]}-{graph.span[1]}; {sweep.meta['seconds']:.0f} s, "
                   f"{sweep.meta['generate_calls']} generate calls)\n",
                   "Mean score (behavioural / coherence) over samples; strengths in threshold units.\n",
                   *table(sweep, strengths), "", *examples(sweep)]
    feature, graph = pick_seed(model, bank, tracer, SUPPRESS, args.layer)
    rs = [0.0, -1.0, -2.0, -4.0]
    sweep = steering_sweep(model, bank, graph, prompt="I think that the biggest problem of the church today is",
                           strengths=rs, op="rescale", samples=args.samples, max_new_tokens=64, seed=0)
    sweep.score(judge, THEMES[SUPPRESS].description, suppress=True)
    sweep.save(out / f"suppress-{SUPPRESS}.json")
    report += [f"\n### Suppression: {SUPPRESS} (seed {feature.ref}, flow graph of {len(graph.nodes)} features; "
               f"{sweep.meta['seconds']:.0f} s)\n",
               "Mean suppression score (behavioural / coherence); columns are r.\n",
               *table(sweep, rs), "", *examples(sweep)]
    print("\n".join(report))
    print(f"\nfinished in {time.perf_counter() - start:.0f} s; sweeps in {out}/")


if __name__ == "__main__":
    main()

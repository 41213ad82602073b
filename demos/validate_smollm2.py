"""The deactivation experiment on the embedded SmolLM2 with its quick bank.

    .venv/bin/python demos/validate_smollm2.py [--texts 20] [--out featureflow-out/validation.json]

Held-out corpus rows (split by document), layers 13, 15 and 17 (the quick bank
covers layers 12-17 only, so the paper's 1/4, 1/2, 3/4 of the depth cannot be
used), 5 random non-BOS positions per text, up to 25 active targets per position,
methods top1 / top5 / random / permutation / pearson / exhaustive, r = 0 with an r sweep for top1,
and the relative LM-loss change for 10 interventions per text and layer.
Prints Markdown tables (summary by method, group shares per layer, r sweep).
"""

from __future__ import annotations

import argparse
import time

import tl_featureflow as ff
from tl_featureflow.causal.experiment import validate
from tl_featureflow.saes.corpus import load_corpus

PAPER = {"top1": (0.65, 0.75), "pearson": (0.65, 0.74), "exhaustive": (0.73, 0.83)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=20)
    parser.add_argument("--layers", type=int, nargs="+", default=[13, 15, 17])
    parser.add_argument("--out", default="featureflow-out/validation.json")
    args = parser.parse_args()
    start = time.perf_counter()
    model = ff.load_embedded_model()
    bank = ff.load_embedded_bank("quick", model=model)
    tokens = load_corpus(model.tokenizer, "heldout", progress=False).tokens[: args.texts]
    tracer = ff.FlowTracer(bank, model)
    report = validate(tracer, model, tokens, layers=args.layers, r=[0.0, -1.0, 0.5, 2.0], loss_samples=10,
                      progress=True)
    report.save(args.out)
    elapsed = time.perf_counter() - start
    print(f"\n{len(report.rows)} interventions on {args.texts} held-out texts in {elapsed:.0f} s; report: {args.out}")
    print("\n| method | success rate | mean activation change | n | mean |loss change| | paper (Gemma 2 2B) |"
          "\n|---|---|---|---|---|---|")
    for method, row in report.summary().items():
        paper = PAPER.get(method)
        ref = f"{paper[0]:.0%} / {paper[1]:.2f}" if paper else "-"
        loss = f"{row['loss_change_abs']:.1e}" if "loss_change_abs" in row else "-"
        print(f"| {method} | {row['success_rate']:.1%} | {row['activation_change']:.3f} | {row['n']} | {loss} | {ref} |")
    print("\n| layer | " + " | ".join(ff_groups()) + " |\n|---|" + "---|" * len(ff_groups()))
    for layer, by_method in report.group_counts.items():
        counts = by_method["top1"]
        total = sum(counts.values()) or 1
        print(f"| {layer} | " + " | ".join(f"{counts[g] / total:.1%}" for g in ff_groups()) + " |")
    print("\nr sweep (top1, mean activation change):", {r: round(v, 3) for r, v in report.r_sweep("top1").items()})


def ff_groups() -> tuple[str, ...]:
    from tl_featureflow.causal.results import ACTIVATION_GROUPS

    return ACTIVATION_GROUPS


if __name__ == "__main__":
    main()

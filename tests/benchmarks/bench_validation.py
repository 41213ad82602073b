"""Benchmark: validation throughput, layer-local batched vs one full forward per intervention.

    .venv/bin/python tests/benchmarks/bench_validation.py [--rows 128] [--layer 15] [--device cpu] [--weights random]

On the embedded SmolLM2 with its quick bank (trained on first use), one held-out
text of 128 tokens: ``rows`` interventions (each removes the top active feature of
res(L-1), mlp(L) and att(L) at one position) are measured both ways in one run, the
results are checked equal, and interventions per second are reported as a ratio.

Then the whole experiment (``validate``) on ``--texts`` held-out texts at the same layer,
one r, in one run: today's methods (top1, random, per-site exhaustive) against the paper's
protocol (top1, pearson, exhaustive_single, attribution, per-site exhaustive; the Pearson
matches computed beforehand from training tokens, as ``validate --paper`` caches them),
as interventions (rows) per second and seconds per text. Both stay on the layer-local
batched path: the paper's methods add one forward per text (attribution) and share the
exhaustive trials.
"""

from __future__ import annotations

import argparse
import time

import _models  # noqa: I001 - puts the project on sys.path first (through _timing)
import torch

import tl_featureflow as ff  # noqa: E402
from tl_featureflow.causal.interventions import Intervention, target_activations  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--texts", type=int, default=2)
    _models.add_arguments(parser)
    args = parser.parse_args()
    model, _ = _models.load_models(args)
    bank = _models.load_bank(args, model)
    text = _models.rows(args, model, "heldout", 1).to(args.device)
    layer = args.layer
    keys = {"res": ("res", layer - 1), "mlp": ("mlp", layer), "att": ("att", layer)}
    _, feats = model.run_with_features(text, bank=bank, return_logits=False)
    gen = torch.Generator().manual_seed(0)
    targets, plans = [], []
    while len(targets) < args.rows:
        pos = int(torch.randint(1, text.shape[1], (1,), generator=gen))
        target = int(feats["res", layer][0, pos].argmax())
        items = [Intervention(key[0], key[1], (int(feats[key][0, pos].argmax()),), (pos,), 0.0) for key in keys.values()]
        targets.append((pos, target))
        plans.append(items)
    with torch.no_grad():
        start = time.perf_counter()
        local = target_activations(model, bank, text, layer, targets, plans)
        t_local = time.perf_counter() - start
        start = time.perf_counter()
        full = target_activations(model, bank, text, layer, targets, plans, layer_local=False)
        t_full = time.perf_counter() - start
    err = float((local - full).abs().max())
    print(f"# validation benchmark: SmolLM2 quick bank, device {args.device}, weights {args.weights}, layer {layer}, {args.rows} interventions, "
          f"text of {text.shape[1]} tokens, torch threads {torch.get_num_threads()}")
    print(f"layer-local batched: {t_local:.2f} s ({args.rows / t_local:.1f} interventions/s)")
    print(f"full forward each:   {t_full:.2f} s ({args.rows / t_full:.1f} interventions/s)")
    print(f"speed-up {t_full / t_local:.1f}x (goal >= 10x); max |difference| {err:.2e}")
    protocols(args, model, bank, layer, args.texts)


def protocols(args, model, bank, layer: int, n_texts: int) -> None:  # type: ignore[no-untyped-def]
    from tl_featureflow.causal.pearson import pearson_matches

    texts = _models.rows(args, model, "heldout", n_texts)
    pearson = pearson_matches(model, bank, [layer], tokens=_models.rows(args, model, "train", 64), progress=False)
    tracer = ff.FlowTracer(bank, model, contexts=None)
    runs = {"today (top1, random, exhaustive)": ("top1", "random", "exhaustive"),
            "paper (top1, pearson, exhaustive_single, attribution, exhaustive)":
                ("top1", "pearson", "exhaustive_single", "attribution", "exhaustive")}
    print(f"# validate at layer {layer}, {n_texts} texts, r = 0")
    for name, methods in runs.items():
        start = time.perf_counter()
        report = ff.validate(tracer, model, texts, layers=[layer], methods=methods, pearson=pearson, progress=False)
        seconds = time.perf_counter() - start
        print(f"{name}: {len(report.rows)} interventions in {seconds:.1f} s: {len(report.rows) / seconds:.1f} "
              f"interventions/s, {seconds / n_texts:.1f} s per text")


if __name__ == "__main__":
    main()

"""Benchmark: validation throughput, layer-local batched vs one full forward per intervention.

    .venv/bin/python tests/benchmarks/bench_validation.py [--rows 128] [--layer 15]

On the embedded SmolLM2 with its quick bank (trained on first use), one held-out
text of 128 tokens: ``rows`` interventions (each removes the top active feature of
res(L-1), mlp(L) and att(L) at one position) are measured both ways in one run, the
results are checked equal, and interventions per second are reported as a ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tl_featureflow as ff  # noqa: E402
from tl_featureflow.causal.interventions import Intervention, target_activations  # noqa: E402
from tl_featureflow.saes.corpus import load_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()
    model = ff.load_embedded_model()
    bank = ff.load_embedded_bank("quick", model=model)
    text = load_corpus(model.tokenizer, "heldout", progress=False).tokens[:1]
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
    print(f"# validation benchmark: SmolLM2 quick bank, layer {layer}, {args.rows} interventions, "
          f"text of {text.shape[1]} tokens, torch threads {torch.get_num_threads()}")
    print(f"layer-local batched: {t_local:.2f} s ({args.rows / t_local:.1f} interventions/s)")
    print(f"full forward each:   {t_full:.2f} s ({args.rows / t_full:.1f} interventions/s)")
    print(f"speed-up {t_full / t_local:.1f}x (goal >= 10x); max |difference| {err:.2e}")


if __name__ == "__main__":
    main()

"""Benchmark: the context pass (labels, cards) against the forward with SAEs it cannot avoid, same rows.

    .venv/bin/python tests/benchmarks/bench_contexts.py [--preset quick] [--rows 192] [--device cpu] [--weights random]

On the embedded SmolLM2-135M-Instruct with a bank from the cache, in one run:

1. ``collect_top_contexts`` over ``--rows`` held-out rows of 128 tokens (every SAE of the bank),
   not cached: seconds and tokens/s. This is what the first ``make demo`` pays once per bank
   (goal: under a minute for the quick bank).
2. The floor: ``run_with_features`` over the same rows and SAEs, discarding the activations.
   The ratio (1) / (2) is the cost of keeping the top contexts, windows and histograms.
3. The cached load (what every later run pays).
"""

from __future__ import annotations

import argparse
import tempfile

import _models  # noqa: E402
import torch
from _timing import timed  # noqa: I001 - puts the project on sys.path first

from tl_featureflow.flow.contexts import DEFAULT_CONTEXT_ROWS, collect_top_contexts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--rows", type=int, default=DEFAULT_CONTEXT_ROWS)
    parser.add_argument("--batch-size", type=int, default=8)
    _models.add_arguments(parser)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, _ = _models.load_models(args)
    bank = _models.load_bank(args, model, args.preset)
    tokens = _models.rows(args, model, "heldout", args.rows)
    n_tokens = tokens.numel()
    print(f"device {args.device}, weights {args.weights}, {torch.get_num_threads()} threads, bank {args.preset}: {bank.describe()}, "
          f"{tokens.shape[0]} rows x {tokens.shape[1]} tokens")

    def floor() -> None:
        for start in range(0, tokens.shape[0], args.batch_size):
            model.run_with_features(tokens[start : start + args.batch_size].to(args.device), bank=bank,
                                    return_logits=False)

    floor_s, _ = timed(floor)
    with tempfile.TemporaryDirectory() as tmp:
        pass_s, contexts = timed(lambda: collect_top_contexts(model, bank, tokens, batch_size=args.batch_size,
                                                              path=f"{tmp}/ctx", progress=False))
        load_s, _ = timed(lambda: collect_top_contexts(model, bank, tokens, path=f"{tmp}/ctx", progress=False))
    fired = sum(int((contexts.values[k][:, 0] > 0).sum()) for k in bank)
    total = sum(bank.d_sae(*k) for k in bank)
    print(f"| context pass | {pass_s:.1f} s | {n_tokens / pass_s:,.0f} tokens/s |")
    print(f"| forward with the bank's SAEs (floor) | {floor_s:.1f} s | {n_tokens / floor_s:,.0f} tokens/s |")
    print(f"| ratio pass / floor | {pass_s / floor_s:.2f} | |")
    print(f"| cached load | {load_s:.2f} s | |")
    print(f"features that fired at least once: {fired} of {total} ({fired / total:.0%})")


if __name__ == "__main__":
    main()

"""Benchmark: Steerer overhead during generate, and a batched sweep vs one setting at a time.

    .venv/bin/python tests/benchmarks/bench_steering.py [--tokens 32] [--repeats 3] [--device cpu] [--weights random]

On the embedded SmolLM2 with its quick bank, in one run:

1. ``model.generate`` (batch 1, greedy, ``--tokens`` new tokens) with no Steerer, with a
   Steerer adding one feature, and with a Steerer adding every feature of a flow graph
   in "generated" position mode (the counting hook included). Runs are interleaved and
   the median of ``--repeats`` is compared (goal: overhead <= 5%).
2. A sweep of 16 settings (2 modes x 8 layer/strength pairs, greedy) run as one batched
   generate vs 16 generates one by one (goal: >= 5x faster); the tokens are compared.
"""

from __future__ import annotations

import argparse
import statistics

import _models  # noqa: E402
from _timing import timed  # noqa: I001 - puts the project on sys.path first

import tl_featureflow as ff  # noqa: E402
from tl_featureflow.steer.sweeps import steering_sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    _models.add_arguments(parser)
    args = parser.parse_args()
    model, _ = _models.load_models(args)
    bank = _models.load_bank(args, model)
    graph = _models.tracer(args, model, bank).trace("14/res/249")
    prompt = model.to_tokens("I think")
    print(f"device {args.device}, weights {args.weights}")
    kwargs = dict(max_new_tokens=args.tokens, do_sample=False, stop_at_eos=False, verbose=False)

    def plain():
        return model.generate(prompt, **kwargs)

    def one_feature():
        with ff.Steerer(model, bank, scale="threshold").add("14/res/249", 8.0):
            return model.generate(prompt, **kwargs)

    def whole_graph():
        with ff.Steerer(model, bank, positions="generated", scale="threshold").along(graph, 8.0, mode="cumulative"):
            return model.generate(prompt, **kwargs)

    plain()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "one feature": [], f"graph ({len(graph.nodes)} features)": []}
    for _ in range(args.repeats):
        for name, fn in zip(times, (plain, one_feature, whole_graph), strict=False):
            times[name].append(timed(fn)[0])
    base = statistics.median(times["plain"])
    print(f"generate, batch 1, {args.tokens} new tokens (median of {args.repeats}):")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:<24} {med:6.2f} s   overhead {100 * (med / base - 1):+5.1f}%")

    sweep_kwargs = dict(prompt=prompt, strengths=[4.0, 16.0], layers=sorted({n.ref.layer for n in graph.nodes})[:4],
                        modes=("single", "cumulative"), baseline=False, do_sample=False, scale="threshold",
                        max_new_tokens=args.tokens // 2, progress=False)
    t_batched, batched = timed(lambda: steering_sweep(model, bank, graph, batch_size=16, **sweep_kwargs))
    t_single, single = timed(lambda: steering_sweep(model, bank, graph, batched=False, **sweep_kwargs))
    same = sum(a.tokens == b.tokens for a, b in zip(batched.rows, single.rows, strict=False))
    print(f"sweep of {len(batched.rows)} settings, {args.tokens // 2} new tokens each: batched {t_batched:.1f} s "
          f"({batched.meta['generate_calls']} call), one by one {t_single:.1f} s -> {t_single / t_batched:.1f}x; "
          f"identical tokens in {same}/{len(batched.rows)} rows")


if __name__ == "__main__":
    main()

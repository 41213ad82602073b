"""Benchmark of data-free matching (issue: FlowTracer performance). Not a test: run on demand.

    .venv/bin/python tests/benchmarks/bench_matching.py            # full sizes (about 15 min on 2 CPU cores)
    .venv/bin/python tests/benchmarks/bench_matching.py --small    # quick check of the script
    .venv/bin/python tests/benchmarks/bench_matching.py --device cuda

Everything is measured side by side in one run and reported as ratios:
1. match(k=1), match(k=5) at n x n against one plain torch matmul of the same shape;
2. peak memory of match at 4n x 4n above its inputs (in a child process);
3. a per-feature Python loop (each feature's argmax separately) on a sample of features,
   extrapolated to all, against match(k=1);
4. flow_map over a synthetic bank of 6 layers x 3 sites x n features against the bare
   matmuls it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tl_featureflow.flow.matching import topk_cosine  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _decoders(n: int, d: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.empty(n, d)
    x.normal_(generator=gen)
    x.div_(x.norm(dim=1, keepdim=True))
    return x.to(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(n: int, d: int, device_name: str) -> None:
    device = torch.device(device_name)
    dst, src = _decoders(n, d, device, 1), _decoders(n, d, device, 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        topk_cosine(dst, src, 1)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        topk_cosine(dst, src, 1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_above_inputs": peak, "inputs": 2 * n * d * 4}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="n=2048, d=256: checks the script in seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=None, help="features per dictionary (default 16384; 2048 with "
                        "--small); past 65536 the 4n memory child and the flow map are skipped")
    parser.add_argument("--d", type=int, default=None, help="d_model (default 2304, Gemma 2 2B's)")
    parser.add_argument("--memory-child", nargs=3, metavar=("N", "D", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(int(args.memory_child[0]), int(args.memory_child[1]), args.memory_child[2])
        return
    device = torch.device(args.device)
    n, d = (2048, 256) if args.small else (16384, 2304)
    n, d = args.n or n, args.d or d
    print(f"# matching benchmark: n={n}, d_model={d}, device={device}, torch threads={torch.get_num_threads()}")
    dst, src = _decoders(n, d, device, 1), _decoders(n, d, device, 2)

    rows = max(1, min(n, 2**31 // n))          # the plain matmul in row blocks of at most 8 GiB of output

    def plain() -> None:
        for i in range(0, n, rows):
            dst[i : i + rows] @ src.T

    t_mm = _time(plain, device, repeat=2)
    t_k1 = _time(lambda: topk_cosine(dst, src, 1), device, repeat=2)
    t_k5 = _time(lambda: topk_cosine(dst, src, 5), device, repeat=2)
    print(f"plain matmul [{n}x{d}] @ [{d}x{n}]: {t_mm:.2f} s ({2 * n * n * d / t_mm / 1e12:.1f} TFLOP/s)")
    print(f"match k=1: {t_k1:.2f} s  -> throughput ratio vs matmul {t_mm / t_k1:.2f} (goal >= 0.85)")
    print(f"match k=5: {t_k5:.2f} s  -> throughput ratio vs matmul {t_mm / t_k5:.2f} (goal >= 0.85)")

    sample = 256
    def naive() -> None:
        for i in range(sample):  # one feature at a time, as a naive implementation would
            int((src @ dst[i]).argmax())
    t_naive = _time(naive, device) * n / sample
    print(f"per-feature loop (argmax of each feature separately, {sample} timed, extrapolated): {t_naive:.1f} s"
          f"  -> match k=1 is {t_naive / t_k1:.1f}x faster (goal >= 20x)")

    if n > 65536:
        return
    big = 4 * n
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(big), str(d), args.device],
                         capture_output=True, text=True, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"peak memory of match at {big}x{big} (d={d}): {mem['peak_above_inputs'] / 2**30:.2f} GiB above "
          f"inputs of {mem['inputs'] / 2**30:.2f} GiB (goal <= 2 GiB)")

    from tl_featureflow import FlowTracer
    from tl_featureflow.synthetic import random_bank

    bank = random_bank(range(6), d_sae=n, d_model=d, device=device)
    tracer = FlowTracer(bank, device=device)
    t_map = _time(lambda: tracer.flow_map(thresholds="paper", progress=False), device)
    pairs = [(tracer.predecessor_keys(layer)[s], ("res", layer)) for layer in range(6) for s in tracer.predecessor_keys(layer)]
    decoders = {key: bank.decoder(*key) for key in bank}
    def bare() -> None:
        for src_key, dst_key in pairs:
            decoders[dst_key] @ decoders[src_key].T
    t_bare = _time(bare, device)
    print(f"flow_map, 6 layers x 3 sites x {n} features ({len(pairs)} matchings): {t_map:.1f} s vs bare matmuls "
          f"{t_bare:.1f} s -> {t_map / t_bare:.2f}x (goal <= 1.2x)")
    t_chance = _time(lambda: [tracer.chance_thresholds(layer) for layer in range(6)], device)
    print(f"chance thresholds for the same 6 layers (n_probe=1024): {t_chance:.1f} s "
          f"({t_chance / t_bare:.2f}x of the bare matmuls)")


if __name__ == "__main__":
    main()

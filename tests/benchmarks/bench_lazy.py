"""Benchmark: peak memory of a flow map from a lazily opened bank against the eager bank (issue 25).

    .venv/bin/python tests/benchmarks/bench_lazy.py [--n 65536] [--bank-layers 8] [--map-layers 1] [--small]

A random JumpReLU bank (SmolLM2's d_model 576, res/mlp/att at ``--bank-layers`` layers, ``--n`` features
per SAE) is saved once; then, each in a fresh child process, ``SAEBank.load(path)`` (eager) and
``SAEBank.load(path, lazy=True)`` (at most 4 SAEs in memory) compute ``flow_map`` of the layers
``--map-layers`` (their res features' matches at res L-1, mlp L, att L). Reported: each child's peak
resident memory (``ru_maxrss``), the bank's size on disk, the time, and whether the maps are equal.
The flow map keeps memory to about one layer's SAEs only if the bank does: the eager bank holds
every SAE from the start. ``--small`` checks the script in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from _timing import child_result

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]


def _child(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    import tl_featureflow as ff
    from tl_featureflow.saes.bank import SAEBank

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    bank = SAEBank.load(args.bank, lazy=args.child == "lazy", verify=False)
    fmap = ff.FlowTracer(bank, contexts=None).flow_map(args.out, layers=args.map_layers, progress=False)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024            # Linux: KiB
    loads = getattr(bank.saes, "loads", len(bank))
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mb": peak_mb, "layers": fmap.layers, "loads": loads}))


def _run(child: str, bank: Path, out: Path, map_layers: list[int]) -> dict:
    command = [sys.executable, str(HERE), "--child", child, "--bank", str(bank), "--out", str(out),
               "--map-layers", *map(str, map_layers)]
    return child_result(command)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--bank-layers", type=int, default=8)
    parser.add_argument("--map-layers", type=int, nargs="+", default=[1])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--child", choices=["eager", "lazy"], help=argparse.SUPPRESS)
    parser.add_argument("--bank", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.small:
        args.n, args.bank_layers = 2048, 3
    import torch

    sys.path.insert(0, str(ROOT))
    from tl_featureflow.flow.flowmap import FlowMap
    from tl_featureflow.synthetic import random_bank

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        bank = random_bank(range(args.bank_layers), d_sae=args.n, d_model=576, arch="jumprelu")
        bank.save(folder / "bank")
        del bank
        size_gb = sum(p.stat().st_size for p in (folder / "bank").rglob("*") if p.is_file()) / 1e9
        print(f"torch {torch.__version__}; bank: {args.bank_layers} layers x 3 sites x {args.n:,} features "
              f"(d_model 576), {size_gb:.2f} GB on disk; flow map of layers {args.map_layers}")
        results = {kind: _run(kind, folder / "bank", folder / kind, args.map_layers) for kind in ("eager", "lazy")}
        eager, lazy = (FlowMap.load(folder / kind) for kind in ("eager", "lazy"))
        same = eager.layers == lazy.layers and all(
            torch.equal(eager[layer].scores[s], lazy[layer].scores[s])
            and torch.equal(eager[layer].indices[s], lazy[layer].indices[s])
            for layer in eager.layers for s in eager[layer].scores)
        for kind, r in results.items():
            print(f"  {kind:<6} peak RSS {r['peak_mb'] / 1024:6.2f} GiB   {r['seconds']:6.1f} s   SAE loads {r['loads']}")
        print(f"  lazy / eager peak: {results['lazy']['peak_mb'] / results['eager']['peak_mb']:.2f}; maps equal: {same}")


if __name__ == "__main__":
    main()

"""Benchmark: 2 gloo ranks against 1 process, same machine, same work (issue 25).

    .venv/bin/python tests/benchmarks/bench_distributed.py [--n 16384] [--layers 4] [--texts 8] [--small]

In one run, each case in turn (nothing else should run beside it):

1. ``flow_map`` of a random bank (SmolLM2's d_model 576, ``--n`` features per SAE, res/mlp/att at
   ``--layers`` layers: 3 x layers - 1 matchings, layer 0 having no res predecessor): one process with
   2 threads (all the cores, the fair baseline), one process with 1 thread, and ``torchrun --nproc-per-node 2`` with 1 thread per rank
   (torchrun's default). The ranks' map must equal the one-process map bit for bit (1 thread each).
2. ``validate`` over ``--texts`` held-out texts of the embedded model and its quick bank (layer 15,
   today's methods), the same three ways; the merged report must equal the one-process report row for row.

Times are of the work alone (after the model and bank are loaded, between barriers) and of the whole
command (what a user waits for, process starts and loads included). Goal of the issue: >= 1.7x for
the flow map. ``--small`` checks the script in seconds (n 1024, 2 layers, 2 texts, random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _timing import child_result

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]


def _worker(args: argparse.Namespace) -> None:
    """One process (or one rank): load, wait for the others, time the work, rank 0 prints RESULT."""
    import torch

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    sys.path.insert(0, str(ROOT))
    from tl_featureflow import distributed
    from tl_featureflow.flow.tracer import FlowTracer
    from tl_featureflow.saes.bank import SAEBank

    ranks = distributed.init("cpu") if "RANK" in os.environ else distributed.single()

    def barrier() -> None:
        if ranks.grouped:
            import torch.distributed as dist

            dist.barrier()

    if args.worker == "map":
        from tl_featureflow.flow import sharded

        bank = SAEBank.load(args.bank)
        tracer = FlowTracer(bank, None, contexts=None)
        barrier()
        start = time.perf_counter()
        sharded.flow_map(tracer, args.out, ranks, progress=False)
    else:
        from tl_featureflow.causal import sharded

        model, bank, tokens = _validation_assets(args)
        tracer = FlowTracer(bank, model, contexts=None)
        barrier()
        start = time.perf_counter()
        report = sharded.validate(tracer, model, tokens, ranks, layers=[args.layer], progress=False)
        if ranks.is_root:
            report.save(args.out)
    barrier()
    seconds = time.perf_counter() - start
    if ranks.is_root:
        print("RESULT " + json.dumps({"work_s": seconds}), flush=True)
    distributed.shutdown(ranks)


def _validation_assets(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch

    import tl_featureflow as ff

    if args.small:
        from tl_featureflow.synthetic import random_bank, tiny_model

        model = tiny_model(gated=True)
        bank = random_bank(range(4), d_sae=48, d_model=64, arch="jumprelu")
        tokens = torch.randint(1, 100, (args.texts, 12), generator=torch.Generator().manual_seed(0))
        return model, bank, tokens
    from tl_featureflow import cli

    model = ff.load_embedded_model()
    bank = ff.load_embedded_bank("quick", model=model)
    return model, bank, cli._heldout_tokens(model, args.texts)


def _run(command: list[str], threads: int) -> tuple[float, float]:
    """``(work seconds, whole-command seconds)`` of one launch."""
    result, whole = child_result(command, OMP_NUM_THREADS=str(threads))
    return result["work_s"], whole


def _cases(work: str, extra: list[str], folder: Path) -> dict[str, tuple[float, float, Path]]:
    me = [sys.executable, str(HERE), "--worker", work, *extra]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HERE),
                "--worker", work, *extra]
    out: dict[str, tuple[float, float, Path]] = {}
    for name, command, threads in (("1 process, 2 threads", me, 2), ("1 process, 1 thread", me, 1),
                                   ("2 ranks, 1 thread each", torchrun, 1)):
        target = folder / f"{work}-{name.replace(' ', '_').replace(',', '')}"
        work_s, whole = _run([*command, "--threads", str(threads), "--out", str(target)], threads)
        out[name] = (work_s, whole, target)
    return out


def _print(title: str, cases: dict[str, tuple[float, float, Path]], same: bool) -> None:
    print(title)
    base_work, base_whole, _ = cases["1 process, 2 threads"]
    one_work, _, _ = cases["1 process, 1 thread"]
    for name, (work_s, whole, _) in cases.items():
        print(f"  {name:<24} work {work_s:7.1f} s ({base_work / work_s:4.2f}x 2 threads, {one_work / work_s:4.2f}x "
              f"1 thread)   whole command {whole:6.1f} s ({base_whole / whole:4.2f}x)")
    print(f"  2 ranks' output == 1 process, 1 thread: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16384, help="features per SAE of the flow map's random bank")
    parser.add_argument("--layers", type=int, default=4, help="layers of the flow map's random bank")
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--layer", type=int, default=15, help="the validated layer")
    parser.add_argument("--small", action="store_true", help="a check of the script in seconds")
    parser.add_argument("--worker", choices=["map", "validate"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--bank", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.small:
        args.n, args.layers, args.texts, args.layer = 1024, 2, 2, 1
    import torch

    sys.path.insert(0, str(ROOT))
    from tl_featureflow.causal.results import ValidationReport
    from tl_featureflow.flow.flowmap import FlowMap
    from tl_featureflow.synthetic import random_bank

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bank = random_bank(range(args.layers), d_sae=args.n, d_model=576, arch="jumprelu")
        bank.save(folder / "bank")
        print(f"torch {torch.__version__}, {os.cpu_count()} cores; flow map: {args.layers} layers x 3 sites x "
              f"{args.n:,} features ({3 * args.layers - 1} matchings); validation: {args.texts} texts, layer "
              f"{args.layer}, {'tiny model' if args.small else 'embedded model, quick bank'}")
        maps = _cases("map", ["--bank", str(folder / "bank")], folder)
        one, two = (FlowMap.load(maps[name][2]) for name in ("1 process, 1 thread", "2 ranks, 1 thread each"))
        same_map = one.layers == two.layers and all(
            torch.equal(one[layer].scores[s], two[layer].scores[s]) and torch.equal(one[layer].indices[s],
                                                                                   two[layer].indices[s])
            for layer in one.layers for s in one[layer].scores)
        _print("flow map:", maps, same_map)
        extra = ["--texts", str(args.texts), "--layer", str(args.layer)] + (["--small"] if args.small else [])
        runs = _cases("validate", extra, folder)
        a, b = (ValidationReport.load(runs[name][2]) for name in ("1 process, 1 thread", "2 ranks, 1 thread each"))
        _print("validation:", runs, a.rows == b.rows)


if __name__ == "__main__":
    main()

"""What each rank of the distributed tests runs: ``torchrun --standalone --nproc-per-node 2 _worker.py SCENARIO OUT``.

Scenarios (rank 0 writes the results under OUT; the test compares them with one process's):

- ``equal``: the sharded flow map (OUT/flowmap), top contexts (OUT/contexts) and validation (OUT/validation.json)
  through the Python API, then ``featureflow validate --distributed`` (OUT/cli-validation.json) and
  ``featureflow map --distributed`` (OUT/cli-map) through the CLI.
- ``raise``: ``featureflow validate --distributed`` where rank 1 raises on text 3.
- ``hang``: the same, where rank 1 hangs on text 3 (a rank that never answers) and the timeout is 5 s.
- ``raise-map``: ``featureflow map --distributed`` where rank 1 raises on the pair att(2) -> res(2), in the second
  round of pairs (after layer 1 was written).
- ``paper``: ``featureflow validate --paper --distributed`` (OUT/paper), the cache in OUT/cache for both ranks.
- ``kill-map``: the same as ``raise-map``, where rank 1 is killed there by SIGKILL (no Python error, no goodbye).

The assets are built the same way in every process (:func:`assets`), and by the test for its reference.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

VALIDATE = dict(layers=[1, 2], methods=["top1", "random", "pearson", "exhaustive_single", "attribution"],
                r=[0.0, 0.5], loss_samples=1, seed=4)
CONTEXTS = dict(n=4, batch_size=2, left=3, right=2)
CLI_VALIDATE = ["--texts", "5", "--layers", "1", "2", "--methods", "top1", "exhaustive", "--r", "0", "-1",
                "--loss-samples", "1"]


def assets() -> dict:
    """A tiny model, the planted chain bank (flow map) and a random JumpReLU bank (contexts, validation), texts
    with repeated rows (equal activations: ties that the merge must order as one pass does)."""
    from tl_featureflow.synthetic import planted_chain_bank, random_bank, tiny_model

    model = tiny_model(gated=True)
    planted, truth = planted_chain_bank()
    bank = random_bank(range(4), d_sae=48, d_model=64, arch="jumprelu")
    texts = torch.randint(1, 100, (9, 12), generator=torch.Generator().manual_seed(0))
    texts[6], texts[8] = texts[2], texts[1]
    return {"model": model, "planted": planted, "truth": truth, "bank": bank, "texts": texts}


PAPER_ARGV = ["validate", "--paper", "--texts", "5", "--layers", "2"]


def _cli(argv: list[str], model, texts) -> int:
    from tl_featureflow import cli

    cli._load_model = lambda args: model
    cli._heldout_tokens = lambda model, n: texts[:n]
    cli._context_tokens = lambda model: texts              # the paper protocol's live features and Pearson rows
    cli._train_tokens = lambda model, n: texts
    return cli.main(argv)


def _plant_failure(rank: int, text: int, hang: bool) -> None:
    """Rank ``rank`` raises (or hangs) when it validates ``text``."""
    from tl_featureflow.causal import experiment

    if int(os.environ["RANK"]) != rank:
        return
    layer_rows = experiment._Experiment.layer_rows

    def failing(self, t, *args, **kwargs):
        if t == text:
            if hang:
                time.sleep(300)
            raise RuntimeError(f"planted failure on rank {rank}")
        return layer_rows(self, t, *args, **kwargs)

    experiment._Experiment.layer_rows = failing


def _plant_map_failure(rank: int, site: str, layer: int, *, kill: bool = False) -> None:
    """Rank ``rank`` raises (or, ``kill``, SIGKILLs itself) when it matches ``site(layer) -> res(layer)``."""
    from tl_featureflow.flow.tracer import FlowTracer

    if int(os.environ["RANK"]) != rank:
        return
    match = FlowTracer.match

    def failing(self, src, dst, k=1):
        if tuple(src) == (site, layer):
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"planted failure on rank {rank}")
        return match(self, src, dst, k)

    FlowTracer.match = failing


def main(scenario: str, out: Path) -> int:
    from tl_featureflow import distributed
    from tl_featureflow.causal import sharded as causal_sharded
    from tl_featureflow.flow import sharded as flow_sharded
    from tl_featureflow.flow.tracer import FlowTracer

    a = assets()
    if scenario == "equal":
        ranks = distributed.init("cpu", timeout_s=60)
        flow_sharded.flow_map(FlowTracer(a["planted"]), out / "flowmap", ranks, progress=False)
        contexts = flow_sharded.top_contexts(a["model"], a["bank"], a["texts"], ranks, progress=False, **CONTEXTS)
        tracer = FlowTracer(a["bank"], a["model"], contexts=None)
        report = causal_sharded.validate(tracer, a["model"], a["texts"][:5], ranks, progress=False, **VALIDATE)
        if ranks.is_root:
            contexts.save(out / "contexts")
            report.save(out / "validation.json")
        # the CLI runs in the same group (which it leaves to the caller who joined it)
        code = _cli(["validate", "--distributed", *CLI_VALIDATE, "--bank", str(out / "bank"),
                     "--out", str(out / "cli-validation.json")], a["model"], a["texts"])
        code = code or _cli(["map", "--distributed", "--bank", str(out / "planted-bank"), "--out",
                             str(out / "cli-map")], a["model"], a["texts"])
        distributed.shutdown(ranks)
        return code
    if scenario == "paper":
        os.environ["TL_FEATUREFLOW_CACHE"] = str(out / "cache")
        return _cli(PAPER_ARGV + ["--distributed", "--bank", str(out / "bank"), "--out", str(out / "paper")],
                    a["model"], a["texts"])
    if scenario in ("raise-map", "kill-map"):
        _plant_map_failure(1, "att", 2, kill=scenario == "kill-map")
        return _cli(["map", "--distributed", "--bank", str(out / "planted-bank"), "--out", str(out / "cli-map")],
                    a["model"], a["texts"])
    _plant_failure(1, 3, hang=scenario == "hang")
    timeout = ["--dist-timeout", "5"] if scenario == "hang" else []
    return _cli(["validate", "--distributed", "--bank", str(out / "bank"), "--texts", "5", "--layers", "2",
                 "--methods", "top1", "--out", str(out / "validation.json"), *timeout], a["model"], a["texts"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))

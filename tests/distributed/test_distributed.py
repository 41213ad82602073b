"""Flow maps, top contexts and validation over 2 gloo ranks (issue 25): torchrun runs tests/distributed/_worker.py,
rank 0 writes what the ranks computed, and it must equal what one process computes here, files byte for byte;
a rank that raises or hangs ends every rank with an error that names it, within the timeout."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.causal.results import ValidationReport
from tl_featureflow.distributed import Ranks, shard_items, shard_range
from tl_featureflow.flow.contexts import TopContexts, collect_top_contexts
from tl_featureflow.flow.tracer import PAPER_THRESHOLDS

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_worker.py")
_spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _launch(scenario: str, out: Path, timeout: float = 150) -> tuple[subprocess.CompletedProcess, float]:
    """torchrun with 2 CPU ranks on a free port (``--standalone``); returns the process and its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), scenario, str(out)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=out)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def one_thread():
    """The ranks compute with one thread each (torchrun's default): so does the single-process reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(one_thread):
    return worker.assets()


@pytest.fixture(scope="module")
def equal_run(tmp_path_factory, assets):
    out = tmp_path_factory.mktemp("equal")
    assets["planted"].save(out / "planted-bank")
    assets["bank"].save(out / "bank")
    proc, _ = _launch("equal", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- cutting the work (no processes) -------------------------------------------------------------------
def test_shards_cover_the_work_once_in_order_and_cut_at_whole_batches():
    for n, world, align in [(9, 2, 2), (5, 2, 1), (3, 4, 1), (0, 2, 1), (17, 3, 8)]:
        shards = [shard_range(n, Ranks(r, world, 0), align=align) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))
        assert all(s.start % align == 0 for s in shards)
        assert max(map(len, shards)) - min(map(len, shards)) <= align
    assert [shard_items("abcde", Ranks(r, 2, 0)) for r in range(2)] == [["a", "c", "e"], ["b", "d"]]
    with pytest.raises(ff.InvalidArgumentError, match="align=0"):
        shard_range(4, Ranks(0, 2, 0), align=0)


def test_outside_torchrun_a_distributed_run_says_how_to_launch_it(monkeypatch):
    from tl_featureflow import distributed

    for name in distributed.ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ff.errors.DistributedError, match=r"torchrun --nproc-per-node N -m tl_featureflow"):
        distributed.init()


# -- two ranks equal one process -------------------------------------------------------------------------
def test_the_sharded_flow_map_writes_the_files_of_one_process(equal_run, assets, tmp_path):
    reference = ff.FlowTracer(assets["planted"]).flow_map(tmp_path / "one", progress=False)
    assert _files(equal_run / "flowmap") == _files(tmp_path / "one")          # layer files and map.json, bytes
    fmap = ff.FlowMap.load(equal_run / "flowmap")
    assert fmap.layers == reference.layers == [1, 2, 3]
    truth = assets["truth"]                                                    # the planted answer, exactly
    result = fmap.classify(2, dict(PAPER_THRESHOLDS))
    assert {ref: result.label(ff.FeatureRef.parse(ref).index) for ref in truth.labels_layer2} == truth.labels_layer2
    assert fmap.chain_lengths()[3][5] == 0 and fmap.chain_lengths()[2][1] == 2   # 0/res/3 -> 1/res/7 -> 2/res/1


def test_the_cli_map_on_two_ranks_writes_what_one_process_does(equal_run, assets, monkeypatch, tmp_path):
    from tl_featureflow import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: assets["model"])
    assert cli.main(["map", "--bank", str(equal_run / "planted-bank"), "--out", str(tmp_path / "one")]) == 0
    assert _files(equal_run / "cli-map") == _files(tmp_path / "one")


def test_the_cli_validation_on_two_ranks_saves_the_report_of_one_process(equal_run, assets, monkeypatch, tmp_path):
    from tl_featureflow import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: assets["model"])
    monkeypatch.setattr(cli, "_heldout_tokens", lambda model, n: assets["texts"][:n])
    argv = ["validate", *worker.CLI_VALIDATE, "--bank", str(equal_run / "bank"), "--out", str(tmp_path / "one.json")]
    assert cli.main(argv) == 0
    one, two = ValidationReport.load(tmp_path / "one.json"), ValidationReport.load(equal_run / "cli-validation.json")
    assert len(one.rows) > 50 and two.rows == one.rows and two.meta == one.meta and two.group_counts == one.group_counts


def test_sharded_top_contexts_equal_one_pass(equal_run, assets):
    one = collect_top_contexts(assets["model"], assets["bank"], assets["texts"], progress=False, **worker.CONTEXTS)
    merged = TopContexts.load(equal_run / "contexts")
    for name in TopContexts._TABLES:
        for key in one.values:
            assert torch.equal(getattr(merged, name)[key], getattr(one, name)[key]), (name, key)
    assert (merged.n_tokens, merged.meta) == (one.n_tokens, one.meta)
    ties = sum(int(((v[:, 1:] == v[:, :-1]) & (v[:, 1:] > 0)).sum()) for v in one.values.values())
    assert ties > 10                                  # the repeated rows' equal activations, ordered as one pass does


def test_sharded_validation_equals_one_process_row_for_row(equal_run, assets):
    tracer = ff.FlowTracer(assets["bank"], assets["model"], contexts=None)
    one = ff.validate(tracer, assets["model"], assets["texts"][:5], progress=False, **worker.VALIDATE)
    merged = ValidationReport.load(equal_run / "validation.json")
    assert len(one.rows) > 100 and {r.text for r in one.rows} == set(range(5))
    assert merged.rows == one.rows and merged.attributions == one.attributions
    assert json.loads(merged.to_json()) == json.loads(one.to_json())


def test_the_paper_protocol_on_two_ranks_writes_the_table_of_one_process(tmp_path, assets, monkeypatch):
    """``validate --paper --distributed``: both ranks share one cache (live features and Pearson matches are
    computed once, under its lock) and rank 0 writes the report and Table 1 of a one-process run."""
    assets["bank"].save(tmp_path / "bank")
    proc, _ = _launch("paper", tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from tl_featureflow import cli

    monkeypatch.setenv("TL_FEATUREFLOW_CACHE", str(tmp_path / "cache-one"))
    for name in ("_load_model", "_heldout_tokens", "_context_tokens", "_train_tokens"):
        monkeypatch.setattr(cli, name, getattr(cli, name))          # _cli patches them: undone after the test
    assert worker._cli(worker.PAPER_ARGV + ["--bank", str(tmp_path / "bank"), "--out", str(tmp_path / "one")],
                       assets["model"], assets["texts"]) == 0
    two, one = (json.loads((tmp_path / name / "validation.json").read_text()) for name in ("paper", "one"))
    assert two["rows"] and two == one
    table = lambda name: [line for line in (tmp_path / name / "table1.md").read_text().splitlines()
                          if "featureflow validate" not in line]
    assert table("paper") == table("one")


# -- failures end every rank -------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["raise", "hang"])
def test_a_rank_that_fails_ends_every_rank_with_an_error_naming_it(tmp_path, assets, scenario):
    assets["bank"].save(tmp_path / "bank")
    proc, seconds = _launch(scenario, tmp_path)
    assert proc.returncode != 0
    assert not (tmp_path / "validation.json").exists()
    if scenario == "raise":      # both ranks print it: texts 3-4 are rank 1's, and it raised on its first
        said = ("featureflow: error: rank 1 of 2 failed while validating its texts: RuntimeError: planted failure on "
                "rank 1 (while validating text 3 (of 5))")
        assert proc.stderr.count(said) == 2, proc.stderr[-3000:]
    else:                        # rank 1 sleeps 300 s on text 3; rank 0 gives up after the 5 s timeout
        said = "featureflow: error: rank 0 of 2: the other ranks did not answer within 5 s while validating its texts"
        assert said in proc.stderr, proc.stderr[-3000:]
        assert seconds < 120                         # torchrun then stops rank 1: no one waits for its 300 s


@pytest.mark.parametrize("scenario", ["raise-map", "kill-map"])
def test_a_rank_that_fails_in_the_flow_map_keeps_the_layers_written_and_a_rerun_resumes(tmp_path, assets, monkeypatch,
                                                                                       scenario):
    """Rank 1 raises (``raise-map``) or is SIGKILLed (``kill-map``: no exception, no message from it) in the
    second round of pairs: the run ends non-zero well within the timeout (torchrun stops rank 0, or gloo sees
    the peer gone); layer 1, written before, is kept, and a rerun computes only what is missing, to the files
    of one process."""
    assets["planted"].save(tmp_path / "planted-bank")
    proc, seconds = _launch(scenario, tmp_path)
    assert proc.returncode != 0 and seconds < 120
    if scenario == "raise-map":
        said = ("featureflow: error: rank 1 of 2 failed while matching layer pairs [(2, 'mlp'), (2, 'att')]: "
                "RuntimeError: planted failure on rank 1 (while matching att(2) -> res(2))")
        assert proc.stderr.count(said) == 2, proc.stderr[-3000:]
    else:
        assert "Signal 9" in proc.stderr or "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    index = json.loads((tmp_path / "cli-map" / "map.json").read_text())
    assert list(index["layers"]) == ["1"] and index["planned_layers"] == [1, 2, 3]     # round 1 finished layer 1
    from tl_featureflow import cli
    from tl_featureflow.flow import sharded

    calls = []
    pair = sharded._pair
    monkeypatch.setattr(sharded, "_pair", lambda tracer, p, *a: calls.append(p) or pair(tracer, p, *a))
    monkeypatch.setattr(cli, "_load_model", lambda args: assets["model"])
    monkeypatch.setattr(cli, "_ranks", lambda args: _single_ranks())
    argv = ["map", "--distributed", "--bank", str(tmp_path / "planted-bank"), "--out", str(tmp_path / "cli-map")]
    assert cli.main(argv) == 0                                                    # the rerun, here on one rank
    assert calls == [(2, "res"), (2, "mlp"), (2, "att"), (3, "res")]
    assert cli.main(["map", "--bank", str(tmp_path / "planted-bank"), "--out", str(tmp_path / "one")]) == 0
    assert _files(tmp_path / "cli-map") == _files(tmp_path / "one")


@contextmanager
def _single_ranks():
    from tl_featureflow.distributed import single

    yield single()

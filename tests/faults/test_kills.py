"""A kill at every write of train_bank, SAEBank.save, flow_map and the contexts cache, then a resume (issue 24).

Each operation runs once in a child process that counts its writes (every ``os.replace``/``rename``/``fsync``/
``unlink``/``rmdir``, ``shutil.rmtree``, ``os.mkdir``, ``tempfile.mkstemp``/``mkdtemp``, file opened for writing,
safetensors ``save_file`` and ``torch.save``: SAELens's checkpoint and model files included), then once per write
in a child SIGKILLed at that write. A ``mkdir``/``mkstemp``/``open`` is killed just after (the empty folder or file
is there), a ``save_file``/``torch.save`` after half its bytes, anything else just before. After the kill:

- what is on disk never loads as a half result: it loads as the old complete result or the new one, or it is
  refused with a FeatureFlowError (checked on a copy, since loading may repair);
- the operation run again in a fresh process ends bit-identical to an uninterrupted run (every byte of the
  bank / map / contexts folder; only the wall-clock time a training records may differ), with the same files
  around it and no debris (``*.tmp``, ``*.old``, temporary folders).

Children are forked from the test process (a fresh pid, no torch import per case) and build their own model and
bank; ``TL_FEATUREFLOW_CACHE`` is set per case.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.flow.contexts import TopContexts, collect_top_contexts, feature_contexts
from tl_featureflow.saes import training
from tl_featureflow.synthetic import planted_chain_bank, tiny_model

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="the killed children are forked"),
              pytest.mark.filterwarnings("ignore::tl_featureflow.saes.quality.BankQualityWarning")]

_CHILD_TIMEOUT_S = 60


# -- the write counter, installed in a child --------------------------------------------------------------------
# (module, attribute, when the kill comes: "before" the call, "after" it, or after "half" of the file is written)
_PRIMITIVES = [(os, "replace", "before"), (os, "rename", "before"), (os, "fsync", "before"), (os, "unlink", "before"),
               (os, "rmdir", "before"), (shutil, "rmtree", "before"), (os, "mkdir", "after"),
               (tempfile, "mkstemp", "after"), (tempfile, "mkdtemp", "after"), (builtins, "open", "after"),
               (io, "open", "after"), (torch, "save", "half")]


def _count_writes(log: list[str], kill_at: int | None) -> None:
    """Wrap the write primitives so that each top-level call appends a description to ``log``; SIGKILL at the
    ``kill_at``-th. Calls made inside a wrapped call (``rmtree``'s unlinks) are not counted apart."""
    import safetensors.torch

    depth = [0]

    def described(name: str, args: tuple, kwargs: dict) -> str:
        target = args[1] if name in ("save", "save_file") else args[0] if args else kwargs.get("prefix", "")
        frames, frame = [], sys._getframe(2)
        while frame is not None and len(frames) < 2:
            if "/tl_featureflow/" in frame.f_code.co_filename or "/sae_lens/" in frame.f_code.co_filename:
                frames.append(f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}")
            frame = frame.f_back
        return f"{name} {Path(str(target)).name} in {' < '.join(frames)}"

    def wrap(name: str, real: Callable, when: str) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if depth[0] or (name == "open" and not set(str(mode)) & set("wxa+")):
                return real(*args, **kwargs)
            write = described(name, args, kwargs)
            if when == "before":
                log.append(write)
                if len(log) - 1 == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            depth[0] += 1
            try:
                out = real(*args, **kwargs)
            finally:
                depth[0] -= 1
            if when != "before":          # counted once done: a mkdir of a folder that is there writes nothing
                log.append(write)
            if when != "before" and len(log) - 1 == kill_at:
                if when == "half":
                    target = str(args[1])
                    os.truncate(target, os.path.getsize(target) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return counted

    for module, name, when in _PRIMITIVES:
        setattr(module, name, wrap(name, getattr(module, name), when))
    real_save_file = safetensors.torch.save_file
    counted_save_file = wrap("save_file", real_save_file, "half")
    for module in list(sys.modules.values()):        # SAELens imports it by name
        if getattr(module, "save_file", None) is real_save_file:
            module.save_file = counted_save_file


def _in_child(work: Callable[[], None], errors: Path) -> int:
    """Run ``work`` in a forked child; its exit status (``-9`` when SIGKILLed), its traceback in ``errors``."""
    pid = os.fork()
    if pid == 0:                                     # the child: never returns into pytest
        code = 0
        try:
            torch.set_num_threads(1)
            work()
        except BaseException:
            errors.write_text(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + _CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"a child ran past {_CHILD_TIMEOUT_S} s")
        time.sleep(0.005)


# -- the operations -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operation:
    run: Callable[[Path], None]                          # the operation, writing under a root folder
    result: Callable[[Path], Path]                       # the folder it makes
    load: Callable[[Path], object]                       # reads that folder as a user would (raises if refused)
    setup: Callable[[Path], None] = lambda root: None    # what is there before it (the old result)


def _scaled_bank(scale: float) -> ff.SAEBank:
    bank, _ = planted_chain_bank()
    with torch.no_grad():
        for sae in bank.values():
            sae.W_dec.mul_(scale)
    return bank


def _tokens() -> torch.Tensor:
    return torch.randint(1, 100, (6, 16), generator=torch.Generator().manual_seed(0))


def _train(root: Path) -> None:
    preset = replace(training.PRESETS["tiny"], training_tokens=1024, batch_tokens=64, chunk_rows=8, n_norm_batches=2,
                     calibration_tokens=256)         # 16 steps, checkpoints after 6 and 11, per-feature thresholds
    rows = torch.randint(1, 100, (32, 17), generator=torch.Generator().manual_seed(0))
    ff.train_bank(tiny_model(n_layers=2, d_model=16), preset=preset, out=root / "run", tokens=rows, sites=["res"],
                  layers=[1], progress=False)


def _load_run(root: Path) -> ff.SAEBank:
    for checkpoint in training.checkpoints(root / "run").values():   # every checkpoint said complete loads
        training.load_checkpoint_bank(checkpoint)
    return ff.SAEBank.load(root / "run" / "bank")


def _contexts(root: Path) -> None:
    os.environ["TL_FEATUREFLOW_CACHE"] = str(root / "cache")
    feature_contexts(tiny_model(), planted_chain_bank()[0], _tokens(), progress=False)


def _contexts_dir(root: Path) -> Path:
    found = list((root / "cache" / "contexts").glob("*/[!.]*"))
    return found[0] if len(found) == 1 else root / "cache" / "contexts" / "none"


def _contexts_at(n: int) -> Callable[[Path], None]:
    def collect(root: Path) -> None:
        collect_top_contexts(tiny_model(), planted_chain_bank()[0], _tokens(), n=n, path=root / "ctx", progress=False)
    return collect


def _save_bank(scale: float) -> Callable[[Path], None]:
    def save(root: Path) -> None:
        _scaled_bank(scale).save(root / "bank")
    return save


def _flow_map(root: Path) -> None:
    ff.FlowTracer(planted_chain_bank()[0]).flow_map(root / "map", progress=False)


OPERATIONS: dict[str, Operation] = {
    "bank-new": Operation(_save_bank(2), lambda root: root / "bank", lambda root: ff.SAEBank.load(root / "bank")),
    "bank-over": Operation(_save_bank(2), lambda root: root / "bank", lambda root: ff.SAEBank.load(root / "bank"),
                           setup=_save_bank(1)),
    "train": Operation(_train, lambda root: root / "run" / "bank", _load_run),
    "flow-map": Operation(_flow_map, lambda root: root / "map", lambda root: ff.FlowMap.load(root / "map")),
    "contexts": Operation(_contexts, _contexts_dir, lambda root: TopContexts.load(_contexts_dir(root))),
    "contexts-over": Operation(_contexts_at(3), lambda root: root / "ctx", lambda root: TopContexts.load(root / "ctx"),
                               setup=_contexts_at(2)),
}

# How many writes each operation makes (its traced run): a change fails test_the_writes_are_as_counted, so that
# new writes get kill cases here.
WRITES = {"bank-new": 24, "bank-over": 28, "train": 43, "flow-map": 19, "contexts": 11, "contexts-over": 11}
CASES = [pytest.param(op, n, id=f"{op}/kill-{n:02d}") for op in OPERATIONS for n in range(WRITES[op])]


# -- what is compared ---------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, Any] | None:
    """Every file of a result folder: JSON parsed (the time a training took left out), anything else as bytes."""
    if not folder.is_dir():
        return None
    files: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data: Any = path.read_bytes()
        if path.suffix == ".json":
            data = json.loads(data)
            if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
                data["metadata"].pop("train_seconds_last_session", None)
        files[path.relative_to(folder).as_posix()] = data
    return files


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _debris(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.suffix in (".tmp", ".old") or (p.name.startswith(".") and p.suffix != ".lock")]


@dataclass
class Reference:
    writes: list[str]                 # the uninterrupted run's writes, in order
    old: dict[str, Any] | None        # the result folder before the operation (setup only)
    new: dict[str, Any]               # and after it
    listing: list[str]                # every path under the root after it


_REFERENCES: dict[str, Reference] = {}


def _reference(op: str, factory: pytest.TempPathFactory) -> Reference:
    """The operation run uninterrupted, its writes counted (once per session)."""
    if op not in _REFERENCES:
        base = factory.mktemp(op)
        operation, log_file, errors = OPERATIONS[op], base / "writes.json", base / "error.txt"
        old_root, new_root = base / "old", base / "new"
        old_root.mkdir(), new_root.mkdir()
        assert _in_child(lambda: operation.setup(old_root), errors) == 0, errors.read_text()

        def counted() -> None:
            operation.setup(new_root)
            log: list[str] = []
            _count_writes(log, None)
            operation.run(new_root)
            log_file.write_text(json.dumps(log))
        assert _in_child(counted, errors) == 0, errors.read_text()
        new = _snapshot(operation.result(new_root))
        assert new is not None
        _REFERENCES[op] = Reference(json.loads(log_file.read_text()), _snapshot(operation.result(old_root)), new,
                                    _listing(new_root))
    return _REFERENCES[op]


@pytest.mark.parametrize("op", OPERATIONS)
def test_the_writes_are_as_counted(op, tmp_path_factory):
    writes = _reference(op, tmp_path_factory).writes
    assert len(writes) == WRITES[op], "\n".join(f"{n:3d} {w}" for n, w in enumerate(writes))


@pytest.mark.parametrize("op,n", CASES)
def test_a_kill_at_every_write_resumes_to_the_same_result(op, n, tmp_path, tmp_path_factory, monkeypatch):
    reference = _reference(op, tmp_path_factory)
    if n >= len(reference.writes):
        pytest.fail(f"{op} makes only {len(reference.writes)} writes (see test_the_writes_are_as_counted)")
    operation, root, errors = OPERATIONS[op], tmp_path / "root", tmp_path / "error.txt"
    monkeypatch.setenv("TL_FEATUREFLOW_CACHE", str(tmp_path / "unused-cache"))    # contexts set their own
    root.mkdir()
    where = f"killed at write {n}: {reference.writes[n]}"
    assert _in_child(lambda: operation.setup(root), errors) == 0, errors.read_text()

    def killed() -> None:
        _count_writes([], n)
        operation.run(root)
    code = _in_child(killed, errors)
    assert code == -signal.SIGKILL, f"{where}: the child ended with {code}, not the kill\n" + (
        errors.read_text() if errors.exists() else "")

    # never a half result that loads: the old result, the new one, or a refusal (on a copy: loading may repair)
    probe = Path(shutil.copytree(root, tmp_path / "probe", symlinks=True))
    try:
        operation.load(probe)
    except ff.FeatureFlowError:
        pass
    else:
        assert _snapshot(operation.result(probe)) in (reference.old, reference.new), f"{where}: a half result loads"

    # the operation again, in a fresh process: the uninterrupted run's result, the same files, no debris
    assert _in_child(lambda: operation.run(root), errors) == 0, f"{where}: the resume failed\n{errors.read_text()}"
    assert not _debris(root), f"{where}: debris left after the resume"
    assert _snapshot(operation.result(root)) == reference.new, f"{where}: the resumed result differs"
    assert _listing(root) == reference.listing, f"{where}: other files than an uninterrupted run's"
    operation.load(root)

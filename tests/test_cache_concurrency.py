"""Two processes building the same cache entry at once: one builds, the other waits, both load it.

Each worker is a separate Python process (as two notebooks, or ``make demo`` beside
``make test``) that asks for the same entry of an empty cache: the converted model
(with a slow fake conversion) and the tokenised corpus. Nothing half-written is ever
loaded, and the entry is built once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tl_featureflow._files import entry_lock, read_manifest

WORKER = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    from contextlib import nullcontext
    from tl_featureflow import embedded
    from tl_featureflow._files import atomic_directory, write_manifest

    folder, log, barrier, locked = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"

    def slow_build(target):
        with open(log, "a") as f:
            f.write("build\\n")
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"x" * 1000)
            time.sleep(1.0)                     # a conversion takes time: the other process arrives meanwhile
            write_manifest(tmp, embedded.MANIFEST, {"schema_version": embedded.CACHE_SCHEMA_VERSION})

    embedded._build_cache = slow_build
    if not locked:
        embedded.entry_lock = lambda entry: nullcontext()
    (barrier / str(os.getpid())).touch()         # ready (imports done): wait for the other worker
    deadline = time.time() + 60
    while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.005)
    out = embedded._verified_cache(folder, verify=True)
    print(json.dumps({"folder": str(out), "size": (out / "weights.bin").stat().st_size}))
''')


def _race(tmp_path: Path, locked: bool) -> tuple[list[dict], int]:
    folder, log, barrier = tmp_path / "cache" / "models" / "m", tmp_path / "builds.log", tmp_path / "barrier"
    barrier.mkdir()    # both workers ask for the entry at the same moment, once both have imported everything
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(log), str(barrier), str(int(locked))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        if locked:   # unlocked, the two folder swaps may also collide: only the build count matters there
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    if locked:
        read_manifest(folder, "manifest.json", verify=True)    # the entry left behind is complete
    return results, log.read_text().count("build")


def test_two_processes_build_one_model_cache_entry(tmp_path):
    results, builds = _race(tmp_path, locked=True)
    assert builds == 1
    assert all(r["size"] == 1000 for r in results)


def test_without_the_lock_both_would_build(tmp_path):
    """The race is real: with the lock disabled both processes convert (so the test above can fail)."""
    _, builds = _race(tmp_path, locked=False)
    assert builds == 2


def test_entry_lock_is_exclusive_and_released(tmp_path):
    import threading
    import time

    entry = tmp_path / "entry"
    order: list[str] = []

    def holder():
        with entry_lock(entry):
            order.append("a in")
            time.sleep(0.3)
            order.append("a out")

    thread = threading.Thread(target=holder)
    thread.start()
    time.sleep(0.1)
    with entry_lock(entry):            # flock is per open file: a second handle waits for the first
        order.append("b in")
    thread.join()
    assert order == ["a in", "a out", "b in"]
    assert (tmp_path / ".entry.lock").is_file() and not entry.exists()


def test_a_failed_build_releases_the_lock_and_leaves_nothing(tmp_path):
    entry = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with entry_lock(entry):
            raise RuntimeError("conversion failed")
    with entry_lock(entry):            # not deadlocked
        pass
    assert not entry.exists()

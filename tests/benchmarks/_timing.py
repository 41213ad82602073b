"""Shared by the benchmarks: the project on sys.path (they run as scripts) and a wall-clock timer."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def child_result(command: list[str], **env: str) -> tuple[dict[str, Any], float]:
    """Run a benchmark's child process (the project on its path, ``env`` added): ``(the dict it printed on its
    ``RESULT {json}`` line, wall seconds)``; exits with its output when it fails or prints none."""
    import json
    import os
    import subprocess

    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), **env))
    whole = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[0].removeprefix("RESULT ")), whole


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call of ``fn``."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out

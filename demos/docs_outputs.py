"""Write the docs' printed outputs from runs, so they cannot drift from the code.

    make docs-outputs          # runs `featureflow demo`, then this script
    .venv/bin/python demos/docs_outputs.py [RUN_DIR]   # RUN_DIR: default featureflow-out/demo

It copies the demo run's summary and settings, and what ``demos/trace_smollm2.py`` prints
on the quick bank, into ``docs/demo-run.json``; rewrites the README's demo block from it
(between :data:`tl_featureflow.demo.README_MARKERS`) and docs/tracing.md's transcripts of
``demos/trace_smollm2.py`` and ``demos/trace_planted.py`` (from a fresh run).
``tests/test_docs.py`` checks them against the json and the current code.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import sys
from pathlib import Path

from tl_featureflow._files import atomic_write_text
from tl_featureflow.demo import README_MARKERS, readme_block
from tl_featureflow.errors import FeatureFlowError

ROOT = Path(__file__).resolve().parents[1]
RUN_FILE = ROOT / "docs" / "demo-run.json"
PLANTED = ".venv/bin/python demos/trace_planted.py"       # checked against a fresh run by the tests
SMOLLM2 = ".venv/bin/python demos/trace_smollm2.py"       # needs the quick bank: kept in RUN_FILE


def demo_run(run_dir: Path) -> dict:
    """What the README shows of a demo run: its summary lines and settings."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise FeatureFlowError(f"no demo run at {run_dir}: run `featureflow demo` first (expected {path})")
    run = json.loads(path.read_text())
    return {"summary": run["summary"], "settings": run["settings"]}


def with_readme_block(readme: str, run: dict) -> str:
    """``readme`` with the text between the markers replaced by :func:`readme_block` of ``run``."""
    start, end = README_MARKERS
    if readme.count(start) != 1 or readme.count(end) != 1:
        raise FeatureFlowError(f"README.md must hold the markers {start!r} and {end!r} once each")
    head, rest = readme.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{readme_block(run)}\n{end}{tail}"


def _pattern(command: str) -> re.Pattern[str]:
    return re.compile(r"```\n" + re.escape(f"$ {command}\n") + r"(.*?)```", re.S)


def transcript_in(doc: str, command: str) -> str:
    """The output printed under ``$ command`` in ``doc``'s fenced block (without that line)."""
    found = _pattern(command).findall(doc)
    if len(found) != 1:
        raise FeatureFlowError(f"the doc must hold one block starting with '$ {command}', found {len(found)}")
    return found[0].strip()


def with_transcript(doc: str, command: str, transcript: str) -> str:
    """``doc`` with the fenced block that starts with ``$ command`` holding ``transcript``."""
    transcript_in(doc, command)                     # exactly one such block
    return _pattern(command).sub(lambda _: f"```\n$ {command}\n{transcript.strip()}\n```", doc)


def printed(script: str) -> str:
    """What ``demos/<script>.py``'s ``main()`` prints."""
    sys.path.insert(0, str(ROOT / "demos"))
    module = importlib.import_module(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()
    return out.getvalue().strip()


def main(argv: list[str]) -> None:
    run = demo_run(Path(argv[0]) if argv else ROOT / "featureflow-out" / "demo")
    run["transcripts"] = {SMOLLM2: printed("trace_smollm2")}
    atomic_write_text(RUN_FILE, json.dumps(run, indent=1, ensure_ascii=False) + "\n")
    readme = ROOT / "README.md"
    atomic_write_text(readme, with_readme_block(readme.read_text(), run))
    tracing = ROOT / "docs" / "tracing.md"
    doc = with_transcript(tracing.read_text(), PLANTED, printed("trace_planted"))
    atomic_write_text(tracing, with_transcript(doc, SMOLLM2, run["transcripts"][SMOLLM2]))
    print(f"wrote {RUN_FILE.relative_to(ROOT)}, README.md's demo block and docs/tracing.md's transcripts")


if __name__ == "__main__":
    main(sys.argv[1:])

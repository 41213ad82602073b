"""Write the docs' printed outputs from runs, so they cannot drift from the code.

    make docs-outputs          # runs `featureflow demo`, then this script
    .venv/bin/python demos/docs_outputs.py [RUN_DIR]   # RUN_DIR: default featureflow-out/demo

It copies the demo run's summary and settings into ``docs/demo-run.json``, rewrites the
README's demo block from it (between :data:`tl_featureflow.demo.README_MARKERS`) and
rewrites docs/tracing.md's transcript of ``demos/trace_planted.py`` from a fresh run.
``tests/test_docs.py`` checks all three against the current code.
"""

from __future__ import annotations

import contextlib
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
TRANSCRIPT = "$ .venv/bin/python demos/trace_planted.py\n"


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


def with_transcript(doc: str, transcript: str) -> str:
    """``doc`` with the fenced block that starts with :data:`TRANSCRIPT` holding ``transcript``."""
    pattern = re.compile(r"```\n" + re.escape(TRANSCRIPT) + r".*?```", re.S)
    if len(pattern.findall(doc)) != 1:
        raise FeatureFlowError(f"docs/tracing.md must hold one block starting with {TRANSCRIPT.strip()!r}")
    return pattern.sub(lambda _: f"```\n{TRANSCRIPT}{transcript.strip()}\n```", doc)


def main(argv: list[str]) -> None:
    run = demo_run(Path(argv[0]) if argv else ROOT / "featureflow-out" / "demo")
    atomic_write_text(RUN_FILE, json.dumps(run, indent=1) + "\n")
    readme = ROOT / "README.md"
    atomic_write_text(readme, with_readme_block(readme.read_text(), run))
    sys.path.insert(0, str(ROOT / "demos"))
    import trace_planted

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trace_planted.main()
    tracing = ROOT / "docs" / "tracing.md"
    atomic_write_text(tracing, with_transcript(tracing.read_text(), out.getvalue()))
    print(f"wrote {RUN_FILE.relative_to(ROOT)}, README.md's demo block and docs/tracing.md's transcript")


if __name__ == "__main__":
    main(sys.argv[1:])

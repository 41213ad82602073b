"""The run folder: where ``featureflow demo`` and ``featureflow validate --paper`` put what they compute,
and what ``featureflow report`` reads back. Its layout lives here and nowhere else.

>>> import tempfile
>>> run = RunDir(tempfile.mkdtemp())
>>> run.write_run({"title": "a run"})
>>> run.read_run()["title"], run.graph("war").relative_to(run.root).as_posix()
('a run', 'graphs/war.json')
>>> run.graphs()                       # nothing saved there yet
[]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_featureflow._files import atomic_write_json, read_json

__all__ = ["RunDir"]


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder (nothing is created until something is written there).

    - ``run.json``: title, summary, settings, the seeds chosen (:meth:`write_run`, :meth:`read_run`)
    - ``cards.json``: the feature cards of every graph's features
    - ``validation.json``: the :class:`~tl_featureflow.causal.results.ValidationReport`
    - ``graphs/<name>.json``: flow graphs; ``steering/<name>.json``: steering sweeps;
      ``report_cards/<name>.json``: steering report cards
    - ``flowmap/``: a :class:`~tl_featureflow.flow.flowmap.FlowMap`; ``table1.md``: Table 1 the paper's way
    - ``report.html``: the report (``featureflow report``)
    """

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def cards(self) -> Path:
        return self.root / "cards.json"

    @property
    def validation(self) -> Path:
        return self.root / "validation.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def flowmap(self) -> Path:
        return self.root / "flowmap"

    @property
    def table1(self) -> Path:
        return self.root / "table1.md"

    def graph(self, name: str) -> Path:
        return self.root / "graphs" / f"{name}.json"

    def sweep(self, name: str) -> Path:
        return self.root / "steering" / f"{name}.json"

    def report_card(self, name: str) -> Path:
        return self.root / "report_cards" / f"{name}.json"

    def graphs(self) -> list[Path]:
        """The saved flow graphs, by name."""
        return sorted((self.root / "graphs").glob("*.json"))

    def sweeps(self) -> list[Path]:
        return sorted((self.root / "steering").glob("*.json"))

    def report_cards(self) -> list[Path]:
        return sorted((self.root / "report_cards").glob("*.json"))

    def write_run(self, data: dict[str, Any]) -> None:
        """Write ``run.json`` (atomically)."""
        atomic_write_json(self.run_json, data)

    def read_run(self) -> dict[str, Any]:
        """``run.json``, or ``{}`` when the run wrote none."""
        return read_json(self.run_json, "a run description") if self.run_json.is_file() else {}

"""ValidationReport: the rows of a deactivation experiment and their summaries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tl_featureflow._files import atomic_write_text, check_header, header, read_json
from tl_featureflow.errors import InvalidArgumentError

__all__ = ["ACTIVATION_GROUPS", "TABLE1_METHODS", "PAPER_TABLE1", "group_name", "ValidationRow",
           "ValidationReport"]

#: The 8 activation groups of a target: which predecessor sites have an active matched feature
#: (not to be confused with the translated/processed/newborn labels of flow.origins).
ACTIVATION_GROUPS: tuple[str, ...] = ("From nowhere", "RES", "MLP", "ATT", "RES & MLP", "RES & ATT", "MLP & ATT",
                                      "RES & MLP & ATT")
#: Table 1's methods, as the paper compared them (plus ours): see :meth:`ValidationReport.table1`.
TABLE1_METHODS: tuple[str, ...] = ("top1", "pearson", "exhaustive_single", "attribution", "exhaustive")
#: The paper's Table 1 (Gemma 2 2B, Gemma Scope 16k, 1,894 features at two layers).
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "top1": {"activation_change": 0.75, "success_rate": 0.65},
    "pearson": {"activation_change": 0.74, "success_rate": 0.65},
    "exhaustive_single": {"activation_change": 0.83, "success_rate": 0.73},
}
_SINGLE_SITE = ("RES", "MLP", "ATT")
_SCHEMA = 2


def _shape(counts: dict[str, dict[str, dict[str, int]]]) -> dict[str, dict[str, list[str]]]:
    return {layer: {method: sorted(groups) for method, groups in methods.items()} for layer, methods in counts.items()}


def group_name(active_sites: set[str]) -> str:
    """``{"res", "mlp"}`` -> ``"RES & MLP"``; the empty set -> ``"From nowhere"``."""
    parts = [s.upper() for s in ("res", "mlp", "att") if s in active_sites]
    return " & ".join(parts) if parts else "From nowhere"


@dataclass
class ValidationRow:
    text: int
    position: int
    target: str            # FeatureRef text, e.g. "15/res/1129"
    method: str
    group: str
    z_old: float
    z_new: float
    r: float
    deactivated: list[str] = field(default_factory=list)
    loss_change: float | None = None

    @property
    def success(self) -> bool:
        return self.z_new <= 0.0

    @property
    def activation_change(self) -> float:
        return 1.0 - self.z_new / self.z_old


@dataclass
class ValidationReport:
    """Rows of a deactivation experiment (one per target, method and r), plus settings.

    ``group_counts[layer][method][group]`` counts every sampled target, "From nowhere"
    ones included (they have no active matched predecessor, so no row).
    """

    rows: list[ValidationRow]
    group_counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    attributions: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        methods = sorted({r.method for r in self.rows})
        return (f"ValidationReport({len(self.rows)} rows, {self.meta.get('n_texts', '?')} texts, layers "
                f"{self.meta.get('layers', '?')}, methods {methods}; .summary() or .table1() to read it)")

    @classmethod
    def merge(cls, reports: Sequence[ValidationReport]) -> ValidationReport:
        """The report of one run from the reports of its shards (``validate(..., texts=shard)`` of the same
        tracer, tokens and settings, each on other texts): what the ranks of a distributed run send back.

        Rows and attributions come in text order (a text's own in the order its run made them),
        group counts add up, and the meta is the run's (without the shard's ``texts``). Since every
        text draws from a generator of its own (:func:`~tl_featureflow.causal.experiment.text_generator`),
        this equals validating all the texts in one process, row for row.

        >>> row = lambda text: ValidationRow(text, 1, "2/res/0", "top1", "RES", 1.0, 0.0, 0.0)
        >>> a = ValidationReport([row(1)], {"2": {"top1": {"RES": 1}}}, {"seed": 0, "texts": [1]})
        >>> b = ValidationReport([row(0)], {"2": {"top1": {"RES": 2}}}, {"seed": 0, "texts": [0]})
        >>> merged = ValidationReport.merge([a, b])
        >>> [r.text for r in merged.rows], merged.group_counts, merged.meta
        ([0, 1], {'2': {'top1': {'RES': 3}}}, {'seed': 0})
        """
        reports = list(reports)
        if not reports or not all(isinstance(r, ValidationReport) for r in reports):
            raise InvalidArgumentError(f"ValidationReport.merge needs a non-empty list of ValidationReports, got "
                                       f"{[type(r).__name__ for r in reports] or 'none'}")
        meta = {k: v for k, v in reports[0].meta.items() if k != "texts"}
        seen: dict[int, int] = {}
        for i, report in enumerate(reports):
            other = {k: v for k, v in report.meta.items() if k != "texts"}
            if other != meta:
                differ = sorted(k for k in set(other) | set(meta) if other.get(k) != meta.get(k))
                raise InvalidArgumentError(f"report {i} of the merge is of another run than report 0 (its meta differs "
                                           f"in {differ}): expected shards of one validate() call's texts")
            for text in report.meta.get("texts", sorted({row.text for row in report.rows})):
                if text in seen and seen[text] != i:
                    raise InvalidArgumentError(f"text {text} is in reports {seen[text]} and {i} of the merge: "
                                               "expected each text in one shard")
                seen[text] = i
            if _shape(report.group_counts) != _shape(reports[0].group_counts):
                raise InvalidArgumentError(f"report {i}'s group counts have other layers, methods or groups than "
                                           "report 0's: expected shards of one validate() call")
        counts = {layer: {method: {group: sum(r.group_counts[layer][method][group] for r in reports) for group in groups}
                          for method, groups in methods.items()}
                  for layer, methods in reports[0].group_counts.items()}
        rows = sorted((row for report in reports for row in report.rows), key=lambda row: row.text)   # stable
        attributions = sorted((a for report in reports for a in report.attributions), key=lambda a: a["text"])
        return cls(rows, counts, meta, attributions=attributions)

    def paper_targets(self) -> list[tuple[int, int, str]]:
        """The paper's Table-1 target set: ``(text, position, target)`` of every target whose top-1
        cosine or pearson group is a single site (From RES, From MLP or From ATT)."""
        main_r = self.meta.get("r", 0.0)
        found = {(row.text, row.position, row.target) for row in self.rows
                 if row.r == main_r and row.method in ("top1", "pearson") and row.group in _SINGLE_SITE}
        return sorted(found)

    def table1(self, methods: tuple[str, ...] | None = None, *, by_group: bool = False) -> dict[str, dict[str, float]]:
        """Table 1 as the paper measured it: the same targets (:meth:`paper_targets`) for every method.

        Per method: ``success_rate``, ``activation_change`` and ``n``. A target for which a method
        found no active predecessor counts as a failure with activation change 0 (the paper
        deactivated each method's own match on the same targets). ``by_group``: keys
        ``"method / GROUP"`` by the target's top-1 cosine group (RES, MLP, ATT, or "other").
        """
        main_r = self.meta.get("r", 0.0)
        present = {row.method for row in self.rows}
        methods = tuple(m for m in (methods or TABLE1_METHODS) if m in present)
        targets = self.paper_targets()
        index = {(row.method, row.text, row.position, row.target): row for row in self.rows if row.r == main_r}
        groups = {(t, p, g): index[("top1", t, p, g)].group if ("top1", t, p, g) in index else "other"
                  for t, p, g in targets}
        table: dict[str, list[tuple[bool, float]]] = {}
        for method in methods:
            for target in targets:
                row = index.get((method, *target))
                outcome = (row.success, row.activation_change) if row is not None else (False, 0.0)
                group = groups[target] if groups[target] in _SINGLE_SITE else "other"
                table.setdefault(f"{method} / {group}" if by_group else method, []).append(outcome)
        return {name: {"success_rate": sum(s for s, _ in v) / len(v), "activation_change": sum(c for _, c in v) / len(v),
                       "n": len(v)} for name, v in table.items()}

    def at_layers(self, layers: int | list[int]) -> ValidationReport:
        """The part of the report whose targets sit at ``layers`` (rows, attributions, group counts; same meta).

        Table 1 per layer: ``report.at_layers(15).table1()``. The paper's target set is then
        the one of those layers alone (each target is chosen by its own layer's rows).

        >>> row = lambda target: ValidationRow(0, 1, target, "top1", "RES", 1.0, 0.0, 0.0)
        >>> ValidationReport([row("8/res/1"), row("15/res/2")]).at_layers(15).rows[0].target
        '15/res/2'
        """
        from tl_featureflow.refs import FeatureRef

        wanted = {int(layer) for layer in ([layers] if isinstance(layers, int) else layers)}

        def here(target: str) -> bool:
            return FeatureRef.parse(target).layer in wanted

        return ValidationReport([row for row in self.rows if here(row.target)],
                                {layer: counts for layer, counts in self.group_counts.items() if int(layer) in wanted},
                                dict(self.meta), [a for a in self.attributions if here(a["target"])])

    def table1_by_layer(self) -> dict[int, dict[str, dict[str, float]]]:
        """:meth:`table1` of each validated layer on its own (:meth:`at_layers`), by layer."""
        return {layer: self.at_layers(layer).table1() for layer in sorted(int(key) for key in self.group_counts)}

    def summary(self, by: str = "method") -> dict[str, dict[str, float]]:
        """Success rate, mean activation change and count, by ``method`` or ``group``
        (``"method,group"`` for both), at the experiment's main ``r``."""
        main_r = self.meta.get("r", 0.0)
        keys = by.split(",")
        table: dict[str, list[ValidationRow]] = {}
        for row in self.rows:
            if row.r != main_r:
                continue
            table.setdefault(" / ".join(str(getattr(row, k)) for k in keys), []).append(row)
        out: dict[str, dict[str, float]] = {}
        for name, group_rows in sorted(table.items()):
            out[name] = {"success_rate": sum(r.success for r in group_rows) / len(group_rows),
                         "activation_change": sum(r.activation_change for r in group_rows) / len(group_rows),
                         "n": len(group_rows)}
            losses = [r.loss_change for r in group_rows if r.loss_change is not None]
            if losses:
                out[name]["loss_change"] = sum(losses) / len(losses)
                out[name]["loss_change_abs"] = sum(abs(x) for x in losses) / len(losses)
        return out

    def r_sweep(self, method: str = "top1") -> dict[float, float]:
        """Mean activation change per r for one method."""
        out: dict[float, list[float]] = {}
        for row in self.rows:
            if row.method == method:
                out.setdefault(row.r, []).append(row.activation_change)
        return {r: sum(v) / len(v) for r, v in sorted(out.items())}

    def to_pandas(self):  # type: ignore[no-untyped-def]
        import pandas as pd

        return pd.DataFrame([{**asdict(r), "success": r.success, "activation_change": r.activation_change}
                             for r in self.rows])

    def to_json(self) -> str:
        return json.dumps({**header("ValidationReport", _SCHEMA),
                           "meta": self.meta, "group_counts": self.group_counts,
                           "rows": [asdict(r) for r in self.rows], "attributions": self.attributions})

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ValidationReport:
        data = read_json(path, "a validation report")
        check_header(data, "ValidationReport", _SCHEMA, path)
        return cls([ValidationRow(**r) for r in data["rows"]], data["group_counts"], data["meta"],
                   attributions=list(data.get("attributions", [])))

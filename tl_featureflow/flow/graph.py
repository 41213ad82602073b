"""FlowGraph: one feature's flow across layers, as nodes and edges (method section 4).

Round-trips exactly through JSON with a schema version (:meth:`FlowGraph.save` /
:meth:`FlowGraph.load`).

>>> import tempfile
>>> from tl_featureflow.flow.tracer import FlowTracer
>>> from tl_featureflow.synthetic import planted_chain_bank
>>> graph = FlowTracer(planted_chain_bank()[0]).trace("2/res/1")
>>> graph.seed, graph.span, [str(e.src) + " -> " + str(e.dst) for e in graph.edges][:2]
(FeatureRef(layer=2, site='res', index=1), (0, 2), ['0/res/3 -> 1/res/7', '1/res/7 -> 2/res/1'])
>>> FlowGraph.load(graph.save(tempfile.mkdtemp() + "/g.json")) == graph
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from tl_featureflow._files import atomic_write_text, check_header, header
from tl_featureflow.errors import CacheError, InvalidArgumentError, MissingDependencyError, UnknownFeatureError
from tl_featureflow.flow import export
from tl_featureflow.refs import FeatureRef, check_layer

__all__ = ["FlowNode", "FlowEdge", "FlowGraph", "GRAPH_SCHEMA_VERSION"]

GRAPH_SCHEMA_VERSION = export.GRAPH_SCHEMA_VERSION

Role = Literal["seed", "chain", "module"]


@dataclass(frozen=True)
class FlowNode:
    """A feature of a flow graph.

    ``role`` is ``seed``, ``chain`` (a res feature of the residual chain) or ``module``
    (an mlp/att predecessor attached to the chain). Res nodes carry their predecessor
    scores ``s_res``, ``s_mlp``, ``s_att`` (None for sites the bank lacks); ``label``
    is a short human-readable description when one is known: what the feature fires on
    (its top contexts, :meth:`TopContexts.label`), else its logit-lens tokens; ``lens``
    holds the logit-lens tokens (the tokens its decoder direction promotes).
    """

    ref: FeatureRef
    role: Role
    s_res: float | None = None
    s_mlp: float | None = None
    s_att: float | None = None
    label: str | None = None
    lens: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ref"] = str(self.ref)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowNode:
        return cls(**{**data, "ref": FeatureRef.parse(data["ref"])})


@dataclass(frozen=True)
class FlowEdge:
    """A match along the forward pass: ``src`` (earlier) feeds ``dst``; ``score`` is the cosine."""

    src: FeatureRef
    dst: FeatureRef
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"src": str(self.src), "dst": str(self.dst), "score": self.score}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowEdge:
        return cls(FeatureRef.parse(data["src"]), FeatureRef.parse(data["dst"]), float(data["score"]))


@dataclass
class FlowGraph:
    """The flow of one seed feature across layers (method section 4).

    ``nodes`` and ``edges`` are sorted along the forward pass; ``span`` is
    ``(l_start, l_end)``, the layers of the residual chain kept above ``t_res``.
    """

    seed: FeatureRef
    nodes: list[FlowNode]
    edges: list[FlowEdge]
    span: tuple[int, int]
    t_res: float
    t_module: float
    direction: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"FlowGraph(seed {self.seed}, {len(self.nodes)} features, {len(self.edges)} edges, "
                f"layers {self.span[0]}-{self.span[1]}, t_res {self.t_res:g}, t_module {self.t_module:g})")

    def __post_init__(self) -> None:
        self.nodes = sorted(self.nodes, key=lambda n: n.ref)
        self.edges = sorted(self.edges, key=lambda e: (e.dst, e.src))
        self._check()

    def _check(self) -> None:
        """A graph that cannot come out of tracing is refused (issue 24 #8: such graphs loaded silently)."""
        refs = {n.ref for n in self.nodes}
        roles = get_args(Role)
        problems = [f"node {n.ref} has role {n.role!r} (expected one of {roles})" for n in self.nodes
                    if n.role not in roles]
        if len(refs) != len(self.nodes):
            problems.append("a feature appears as two nodes")
        if self.seed not in refs:
            problems.append(f"the seed {self.seed} is not a node")
        problems += [f"edge {e.src} -> {e.dst} names a feature that is not a node" for e in self.edges
                     if e.src not in refs or e.dst not in refs]
        problems += [f"edge {e.src} -> {e.dst} has score {e.score!r} (expected a finite cosine)" for e in self.edges
                     if not math.isfinite(e.score)]
        if len(self.span) != 2 or self.span[0] > self.span[1]:
            problems.append(f"span {tuple(self.span)} is not (l_start, l_end) with l_start <= l_end")
        if math.isinf(self.t_res) or math.isinf(self.t_module):     # NaN: not known (a graph written elsewhere)
            problems.append(f"thresholds t_res={self.t_res}, t_module={self.t_module} are infinite")
        if self.direction not in ("backward", "forward", "both"):
            problems.append(f"direction {self.direction!r} (expected 'backward', 'forward' or 'both')")
        if problems:
            raise InvalidArgumentError(f"not a flow graph of {self.seed}: " + "; ".join(problems[:5]))

    def __contains__(self, ref: object) -> bool:
        return any(n.ref == ref for n in self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[FlowNode]:
        return iter(self.nodes)

    def node(self, ref: FeatureRef | str) -> FlowNode:
        ref = FeatureRef.parse(ref)
        for node in self.nodes:
            if node.ref == ref:
                return node
        raise UnknownFeatureError(f"{ref} is not in the flow graph of {self.seed}")

    @property
    def chain(self) -> list[FeatureRef]:
        """The residual chain, one res feature per layer, first layer first."""
        return [n.ref for n in self.nodes if n.role in ("seed", "chain")]

    @property
    def modules(self) -> list[FeatureRef]:
        """The mlp/att side nodes."""
        return [n.ref for n in self.nodes if n.role == "module"]

    def refs_up_to(self, layer: int) -> list[FeatureRef]:
        """Every node's feature at layers <= ``layer`` (for cumulative steering)."""
        layer = check_layer(layer, "res")
        return [n.ref for n in self.nodes if n.ref.layer <= layer]

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            **header("FlowGraph", GRAPH_SCHEMA_VERSION),
            "seed": str(self.seed),
            "span": list(self.span),
            "t_res": self.t_res,
            "t_module": self.t_module,
            "direction": self.direction,
            "nodes": [n.to_dict() for n in self.nodes],
            "edges": [e.to_dict() for e in self.edges],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowGraph:
        check_header(data, "FlowGraph", GRAPH_SCHEMA_VERSION, "flow graph")
        try:
            return cls(
                seed=FeatureRef.parse(data["seed"]),
                nodes=[FlowNode.from_dict(n) for n in data["nodes"]],
                edges=[FlowEdge.from_dict(e) for e in data["edges"]],
                span=(int(data["span"][0]), int(data["span"][1])),
                t_res=float(data["t_res"]),
                t_module=float(data["t_module"]),
                direction=str(data["direction"]),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:   # InvalidArgumentError is a ValueError
            raise CacheError(f"not a valid flow graph: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> FlowGraph:
        """A graph from :meth:`to_json`'s text, or from attribution-graph JSON (:meth:`to_neuronpedia`)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CacheError(f"flow graph JSON is corrupt: {exc}") from exc
        return cls.from_dict(export.from_neuronpedia(data) if export.is_neuronpedia(data) else data)

    def to_neuronpedia(self, **kwargs: Any) -> dict[str, Any]:
        """The graph as the attribution-graph JSON circuit-tracer's viewer and Neuronpedia read
        (a JSON-ready dict; see :mod:`tl_featureflow.flow.export` for the mapping and ``kwargs``)."""
        return export.to_neuronpedia(self.to_dict(), **kwargs)

    @classmethod
    def from_neuronpedia(cls, data: dict[str, Any]) -> FlowGraph:
        """Read back what :meth:`to_neuronpedia` wrote (exactly)."""
        return cls.from_dict(export.from_neuronpedia(data))

    def save(self, path: str | Path, *, format: Literal["tl_featureflow", "neuronpedia"] = "tl_featureflow") -> Path:
        """Write the graph as JSON, atomically: ours, or ``format="neuronpedia"`` for circuit-tracer's
        viewer and Neuronpedia. :meth:`load` reads both."""
        if format not in ("tl_featureflow", "neuronpedia"):
            raise InvalidArgumentError(f"format={format!r}: expected 'tl_featureflow' or 'neuronpedia'")
        text = self.to_json() if format == "tl_featureflow" else json.dumps(self.to_neuronpedia(), indent=1)
        atomic_write_text(path, text)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> FlowGraph:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CacheError(f"cannot read flow graph {path}: {exc}") from exc
        return cls.from_json(text)

    def to_networkx(self):  # type: ignore[no-untyped-def]
        """A ``networkx.DiGraph`` with feature names as nodes (needs networkx)."""
        try:
            import networkx as nx
        except ImportError as exc:
            raise MissingDependencyError("to_networkx needs networkx: pip install networkx") from exc
        graph = nx.DiGraph(seed=str(self.seed), span=self.span)
        for node in self.nodes:
            graph.add_node(str(node.ref), **node.to_dict())
        for edge in self.edges:
            graph.add_edge(str(edge.src), str(edge.dst), score=edge.score)
        return graph

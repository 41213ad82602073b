"""Flow graphs in the attribution-graph JSON that circuit-tracer's front end and Neuronpedia read.

The format is circuit-tracer's (``circuit_tracer.frontend.graph_models.Model``, version
0.5.0): ``metadata`` (slug, scan, transcoder_list, prompt_tokens, prompt,
node_threshold, schema_version), ``qParams`` (pinned and clicked node ids, supernodes,
link type), ``nodes`` and ``links`` (``source``, ``target``, ``weight``). A flow graph maps
onto it like this:

- every feature is a node of feature type ``"cross layer transcoder"`` (the viewer's
  type for a learned feature) at ``layer`` = its layer and ``ctx_idx`` 0 (flow graphs
  are data-free: no token position). Three sites share a layer, so the node's feature
  number is ``index * 3 + site_code`` (res 0, mlp 1, att 2), in ids
  ``"{layer}_{feature}_0"`` as circuit-tracer writes them; ``clerp`` (the viewer's label)
  is ``"14/res/249"`` plus the node's own label;
- every edge is a link whose weight is its decoder cosine;
- a graph from elsewhere (no ``tl_featureflow`` entries) reads back with its clicked node
  as seed, no scores, and NaN thresholds;
- the seed is pinned and clicked; ``node_threshold`` is None.

Each node and the metadata also carry a ``tl_featureflow`` entry (the node's scores
and role; the graph's seed, span, meta and schema version) that the viewers ignore and
:func:`from_neuronpedia` reads, so a graph round-trips exactly.

>>> from tl_featureflow.flow.tracer import FlowTracer
>>> from tl_featureflow.synthetic import planted_chain_bank
>>> graph = FlowTracer(planted_chain_bank()[0]).trace("2/res/1")
>>> data = to_neuronpedia(graph)
>>> data["nodes"][0]["node_id"], data["nodes"][0]["clerp"], data["links"][0]["weight"] > 0.5
('0_9_0', '0/res/3', True)
>>> from_neuronpedia(data) == graph
True
"""

from __future__ import annotations

from typing import Any

from tl_featureflow.errors import CacheError
from tl_featureflow.flow.graph import FlowEdge, FlowGraph, FlowNode
from tl_featureflow.refs import SITES, FeatureRef

__all__ = ["to_neuronpedia", "from_neuronpedia", "is_neuronpedia", "NEURONPEDIA_SCHEMA_VERSION", "FEATURE_TYPE"]

NEURONPEDIA_SCHEMA_VERSION = 1     # circuit-tracer's Metadata.schema_version
FEATURE_TYPE = "cross layer transcoder"
_CODE = {site: i for i, site in enumerate(SITES)}


def _feature_number(ref: FeatureRef) -> int:
    return ref.index * len(SITES) + _CODE[ref.site]


def _node_id(ref: FeatureRef) -> str:
    return f"{ref.layer}_{_feature_number(ref)}_0"


def _cantor(x: int, y: int) -> int:
    """circuit-tracer's unique integer of a (layer, feature) pair."""
    return (x + y) * (x + y + 1) // 2 + y


def _ref_of(node: dict[str, Any]) -> FeatureRef:
    own = node.get("tl_featureflow")
    if isinstance(own, dict) and "ref" in own:
        return FeatureRef.parse(own["ref"])
    layer, number, _ = str(node["node_id"]).split("_")   # a graph written by another tool: decode the id
    index, code = divmod(int(number), len(SITES))
    return FeatureRef(int(layer), SITES[code], index)


def to_neuronpedia(graph: FlowGraph, *, slug: str | None = None, scan: str | None = None,
                   prompt: str = "", prompt_tokens: list[str] | None = None) -> dict[str, Any]:
    """The graph as circuit-tracer / Neuronpedia attribution-graph JSON (a JSON-ready dict).

    ``slug`` names the graph in the viewer (default ``"flow-<seed>"``); ``scan`` names the
    model (default: ``graph.meta["model"]``, else ``"tl_featureflow"``); ``prompt`` and
    ``prompt_tokens`` stay empty for a data-free flow graph unless given.
    """
    nodes = []
    for node in graph.nodes:
        number = _feature_number(node.ref)
        nodes.append({
            "node_id": _node_id(node.ref), "feature": _cantor(node.ref.layer, number), "layer": str(node.ref.layer),
            "ctx_idx": 0, "feature_type": FEATURE_TYPE, "token_prob": 0.0, "is_target_logit": False,
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": f"{node.ref.layer}_{number}-0",
            "clerp": str(node.ref) + (f": {node.label}" if node.label else ""),
            "influence": node.s_res, "activation": None,
            "tl_featureflow": node.to_dict(),
        })
    links = [{"source": _node_id(e.src), "target": _node_id(e.dst), "weight": float(e.score)} for e in graph.edges]
    seed_id = _node_id(graph.seed)
    layers = sorted({(n.ref.layer, n.ref.site) for n in graph.nodes})
    return {
        "metadata": {
            "slug": slug or f"flow-{str(graph.seed).replace('/', '-')}",
            "scan": scan or str(graph.meta.get("model", "tl_featureflow")),
            "transcoder_list": [f"{layer}/{site}" for layer, site in layers],
            "prompt_tokens": list(prompt_tokens or []), "prompt": prompt, "node_threshold": None,
            "schema_version": NEURONPEDIA_SCHEMA_VERSION,
            "tl_featureflow": {k: v for k, v in graph.to_dict().items() if k not in ("nodes", "edges")},
        },
        "qParams": {"pinnedIds": [seed_id], "supernodes": [], "linkType": "both", "clickedId": seed_id, "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


def is_neuronpedia(data: Any) -> bool:
    """Whether ``data`` looks like attribution-graph JSON (rather than :meth:`FlowGraph.to_dict`'s)."""
    return isinstance(data, dict) and "links" in data and "metadata" in data and "nodes" in data


def from_neuronpedia(data: dict[str, Any]) -> FlowGraph:
    """The FlowGraph of attribution-graph JSON written by :func:`to_neuronpedia` (exactly), or of a graph
    of the same node-id scheme written elsewhere (then without scores; the clicked node is the seed).

    Raises:
        CacheError: ``data`` is not attribution-graph JSON, or a link names a node it lacks.
    """
    if not is_neuronpedia(data):
        raise CacheError("not an attribution graph: expected 'metadata', 'nodes' and 'links'")
    try:
        refs = {str(n["node_id"]): _ref_of(n) for n in data["nodes"]}
        nodes = [FlowNode.from_dict(n["tl_featureflow"]) if isinstance(n.get("tl_featureflow"), dict)
                 else FlowNode(refs[str(n["node_id"])], "chain", label=n.get("clerp") or None)
                 for n in data["nodes"]]
        edges = [FlowEdge(refs[str(link["source"])], refs[str(link["target"])], float(link["weight"]))
                 for link in data["links"]]
        own = data["metadata"].get("tl_featureflow")
        if isinstance(own, dict):   # written by to_neuronpedia: the graph's own fields (checked by from_dict)
            return FlowGraph.from_dict({**own, "nodes": [n.to_dict() for n in nodes],
                                        "edges": [e.to_dict() for e in edges]})
        seed = refs[str(data["qParams"]["clickedId"])]
        layers = [ref.layer for ref in refs.values() if ref.site == "res"] or [seed.layer]
        return FlowGraph(seed=seed, nodes=nodes, edges=edges, span=(min(layers), max(layers)), t_res=float("nan"),
                         t_module=float("nan"), direction="both", meta={"source": str(data["metadata"].get("slug"))})
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"attribution graph JSON is malformed: {exc!r}") from exc

"""Flow graphs in the attribution-graph JSON that circuit-tracer's front end and Neuronpedia read.

Pure format conversion between two JSON dialects: :meth:`FlowGraph.to_dict`'s and
circuit-tracer's. ``FlowGraph.to_neuronpedia`` / ``from_neuronpedia`` / ``save(...,
format="neuronpedia")`` / ``load`` use it.

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
  is ``"14/res/249"`` plus the node's own label; a feature of the embedding SAE (layer -1)
  keeps layer ``-1`` and gets the negative ``feature`` number ``-1 - feature_number``, so
  that it collides with no feature of a real layer;
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
>>> data = graph.to_neuronpedia()               # to_neuronpedia(graph.to_dict())
>>> data["nodes"][0]["node_id"], data["nodes"][0]["clerp"], data["links"][0]["weight"] > 0.5
('0_9_0', '0/res/3', True)
>>> type(graph).from_neuronpedia(data) == graph
True
"""

from __future__ import annotations

from typing import Any

from tl_featureflow.errors import CacheError
from tl_featureflow.refs import SITES, FeatureRef

__all__ = ["to_neuronpedia", "from_neuronpedia", "is_neuronpedia", "NEURONPEDIA_SCHEMA_VERSION", "FEATURE_TYPE"]

NEURONPEDIA_SCHEMA_VERSION = 1     # circuit-tracer's Metadata.schema_version
GRAPH_SCHEMA_VERSION = 1           # FlowGraph's (flow.graph imports this module, not the other way round)
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


def to_neuronpedia(graph: dict[str, Any], *, slug: str | None = None, scan: str | None = None,
                   prompt: str = "", prompt_tokens: list[str] | None = None) -> dict[str, Any]:
    """A flow graph's dict (:meth:`FlowGraph.to_dict`) as attribution-graph JSON (a JSON-ready dict).

    ``slug`` names the graph in the viewer (default ``"flow-<seed>"``); ``scan`` names the
    model (default: the graph's ``meta["model"]``, else ``"tl_featureflow"``); ``prompt`` and
    ``prompt_tokens`` stay empty for a data-free flow graph unless given.
    """
    nodes = []
    for node in graph["nodes"]:
        ref = FeatureRef.parse(node["ref"])
        number = _feature_number(ref)
        unique = _cantor(ref.layer, number) if ref.layer >= 0 else -1 - number     # the embedding SAE: negative
        nodes.append({
            "node_id": _node_id(ref), "feature": unique, "layer": str(ref.layer),
            "ctx_idx": 0, "feature_type": FEATURE_TYPE, "token_prob": 0.0, "is_target_logit": False,
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": f"{ref.layer}_{number}-0",
            "clerp": str(ref) + (f": {node['label']}" if node.get("label") else ""),
            "influence": node.get("s_res"), "activation": None,
            "tl_featureflow": dict(node),
        })
    links = [{"source": _node_id(FeatureRef.parse(e["src"])), "target": _node_id(FeatureRef.parse(e["dst"])),
              "weight": float(e["score"])} for e in graph["edges"]]
    seed = FeatureRef.parse(graph["seed"])
    seed_id = _node_id(seed)
    keys = sorted({(FeatureRef.parse(n["ref"]).layer, FeatureRef.parse(n["ref"]).site) for n in graph["nodes"]})
    return {
        "metadata": {
            "slug": slug or f"flow-{str(seed).replace('/', '-')}",
            "scan": scan or str(graph.get("meta", {}).get("model", "tl_featureflow")),
            "transcoder_list": [f"{layer}/{site}" for layer, site in keys],
            "prompt_tokens": list(prompt_tokens or []), "prompt": prompt, "node_threshold": None,
            "schema_version": NEURONPEDIA_SCHEMA_VERSION,
            "tl_featureflow": {k: v for k, v in graph.items() if k not in ("nodes", "edges")},
        },
        "qParams": {"pinnedIds": [seed_id], "supernodes": [], "linkType": "both", "clickedId": seed_id, "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


def is_neuronpedia(data: Any) -> bool:
    """Whether ``data`` looks like attribution-graph JSON (rather than :meth:`FlowGraph.to_dict`'s)."""
    return isinstance(data, dict) and "links" in data and "metadata" in data and "nodes" in data


def from_neuronpedia(data: dict[str, Any]) -> dict[str, Any]:
    """The flow graph's dict (for :meth:`FlowGraph.from_dict`) of attribution-graph JSON written by
    :func:`to_neuronpedia` (exactly), or of a graph of the same node-id scheme written elsewhere (then
    without scores and thresholds; the clicked node is the seed).

    Raises:
        CacheError: ``data`` is not attribution-graph JSON, or a link names a node it lacks.
    """
    if not is_neuronpedia(data):
        raise CacheError("not an attribution graph: expected 'metadata', 'nodes' and 'links'")
    try:
        refs = {str(n["node_id"]): _ref_of(n) for n in data["nodes"]}
        nodes = [dict(n["tl_featureflow"]) if isinstance(n.get("tl_featureflow"), dict)
                 else {"ref": str(refs[str(n["node_id"])]), "role": "chain", "s_res": None, "s_mlp": None,
                       "s_att": None, "label": n.get("clerp") or None}
                 for n in data["nodes"]]
        edges = [{"src": str(refs[str(link["source"])]), "dst": str(refs[str(link["target"])]),
                  "score": float(link["weight"])} for link in data["links"]]
        own = data["metadata"].get("tl_featureflow")
        if isinstance(own, dict):   # written by to_neuronpedia: the graph's own fields
            return {**own, "nodes": nodes, "edges": edges}
        seed = refs[str(data["qParams"]["clickedId"])]
        layers = [ref.layer for ref in refs.values() if ref.site == "res"] or [seed.layer]
        return {"schema_version": GRAPH_SCHEMA_VERSION, "seed": str(seed), "span": [min(layers), max(layers)],
                "t_res": float("nan"), "t_module": float("nan"), "direction": "both",
                "meta": {"source": str(data["metadata"].get("slug"))}, "nodes": nodes, "edges": edges}
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"attribution graph JSON is malformed: {exc!r}") from exc

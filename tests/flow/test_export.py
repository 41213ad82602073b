"""Flow graphs exported as circuit-tracer / Neuronpedia attribution-graph JSON, and read back."""

from __future__ import annotations

import json

import pytest

import tl_featureflow as ff
from tl_featureflow.flow.export import FEATURE_TYPE, from_neuronpedia, to_neuronpedia
from tl_featureflow.synthetic import planted_chain_bank


@pytest.fixture
def graph() -> ff.FlowGraph:
    tracer = ff.FlowTracer(planted_chain_bank()[0])
    graph = tracer.trace("2/res/1", t_module=0.15)
    assert {n.ref.site for n in graph.nodes} >= {"res", "mlp"}     # module nodes share layers with res nodes
    graph.nodes[0] = ff.flow.graph.FlowNode(graph.nodes[0].ref, graph.nodes[0].role, graph.nodes[0].s_res,
                                 graph.nodes[0].s_mlp, graph.nodes[0].s_att, label="'Paris' — …capital is [Paris]",
                                 lens="'Paris' 'France'")
    return graph


def test_export_round_trips_exactly(graph, tmp_path):
    assert ff.FlowGraph.from_dict(from_neuronpedia(json.loads(json.dumps(to_neuronpedia(graph.to_dict()))))) == graph
    path = graph.save(tmp_path / "g.json", format="neuronpedia")
    assert "links" in json.loads(path.read_text()) and ff.FlowGraph.load(path) == graph
    assert ff.FlowGraph.from_neuronpedia(graph.to_neuronpedia(slug="x")) == graph
    with pytest.raises(ff.InvalidArgumentError, match="format"):
        graph.save(tmp_path / "h.json", format="graphml")  # type: ignore[arg-type]


def test_nodes_and_links_follow_circuit_tracers_conventions(graph):
    data = graph.to_neuronpedia(slug="paris", scan="smollm2")
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids) == len(graph.nodes)                  # three sites per layer, no clash
    assert {link["source"] for link in data["links"]} | {link["target"] for link in data["links"]} <= set(ids)
    for node, flow_node in zip(data["nodes"], graph.nodes, strict=True):
        layer, number, pos = node["node_id"].split("_")
        assert (int(layer), divmod(int(number), 3), pos) == (
            flow_node.ref.layer, (flow_node.ref.index, ("res", "mlp", "att").index(flow_node.ref.site)), "0")
        assert node["layer"] == layer and node["feature_type"] == FEATURE_TYPE
        assert node["clerp"].startswith(str(flow_node.ref))
    assert data["qParams"]["clickedId"] == data["qParams"]["pinnedIds"][0] == f"2_{1 * 3 + 0}_0"
    assert data["metadata"]["slug"] == "paris" and data["metadata"]["scan"] == "smollm2"
    assert [link["weight"] for link in data["links"]] == [e.score for e in graph.edges]


def test_export_validates_against_circuit_tracers_own_schema(graph):
    """The front end's pydantic models (circuit-tracer 0.5.0 on PyPI, installed with --no-deps by make)."""
    models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    model = models.Model.model_validate(graph.to_neuronpedia())
    assert len(model.nodes) == len(graph.nodes) and model.metadata.schema_version == 1
    assert all(models.Link(**link) for link in model.links)
    broken = graph.to_neuronpedia()
    del broken["nodes"][0]["layer"]
    with pytest.raises(Exception, match="layer"):
        models.Model.model_validate(broken)


def test_a_graph_written_elsewhere_reads_with_the_clicked_node_as_seed(graph):
    data = graph.to_neuronpedia()
    del data["metadata"]["tl_featureflow"]
    for node in data["nodes"]:
        del node["tl_featureflow"]
    foreign = ff.FlowGraph.from_neuronpedia(data)
    assert foreign.seed == graph.seed and [n.ref for n in foreign.nodes] == [n.ref for n in graph.nodes]
    assert [(e.src, e.dst) for e in foreign.edges] == [(e.src, e.dst) for e in graph.edges]
    with pytest.raises(ff.CacheError, match="malformed"):
        from_neuronpedia({**data, "links": [{"source": "9_9_0", "target": data["nodes"][0]["node_id"], "weight": 1}]})
    with pytest.raises(ff.CacheError, match="not an attribution graph"):
        from_neuronpedia({"nodes": []})

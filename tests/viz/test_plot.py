"""Plot builders on result objects from planted banks: counts of nodes, edges and traces, hover, HTML."""

import plotly.graph_objects as go
import pytest

import tl_featureflow as ff
from tl_featureflow.causal.results import ValidationReport, ValidationRow
from tl_featureflow.steer.sweeps import SteeringSweep, SweepRow, SweepSettings
from tl_featureflow.synthetic import planted_chain_bank, random_bank
from tl_featureflow.viz import plot


@pytest.fixture(scope="module")
def planted():
    bank, truth = planted_chain_bank()
    tracer = ff.FlowTracer(bank)
    graph = tracer.trace(truth.chain[2], t_res=0.25, t_module=0.15)
    return tracer, graph


def _node_points(fig):
    return sum(len(t.x) for t in fig.data if t.mode == "markers+text")


def test_flow_graph_has_every_node_and_edge_with_hover(planted):
    _, graph = planted
    fig = plot.flow_graph(graph)
    assert isinstance(fig, go.Figure)
    assert _node_points(fig) == len(graph.nodes)
    edges = [t for t in fig.data if t.name == "edge"]
    assert len(edges) == len(graph.edges) and len(fig.data) == len(edges) + len({n.ref.site for n in graph.nodes})
    hover = " ".join(h for t in fig.data if t.mode == "markers+text" for h in t.hovertext)
    for node in graph.nodes:
        assert str(node.ref) in hover
    assert all(f"cos {e.score:.3f}" in fig.data[i].text[0] for i, e in enumerate(graph.edges))
    widths = [t.line.width for t in edges]
    best = max(range(len(graph.edges)), key=lambda i: graph.edges[i].score)
    assert widths[best] == max(widths)


def test_flow_sankey_links(planted):
    _, graph = planted
    fig = plot.flow_sankey(graph)
    sankey = fig.data[0]
    assert len(sankey.node.label) == len(graph.nodes) and len(sankey.link.source) == len(graph.edges)
    assert str(graph.seed) in sankey.node.label


def test_score_distributions_and_group_composition(planted):
    tracer, _ = planted
    fig = plot.score_distributions([tracer.scores(layer) for layer in (1, 2, 3)])
    with pytest.raises(ff.FeatureFlowError, match="result objects"):
        plot.score_distributions(tracer)
    assert {t.name for t in fig.data} == {"s(RES)", "s(MLP)", "s(ATT)"}
    res = next(t for t in fig.data if t.name == "s(RES)")
    assert len(res.y) == 3 * 12                       # every feature of the three layers
    fmap = tracer.flow_map(progress=False)
    fig = plot.group_composition(fmap)
    assert [t.name for t in fig.data] == list(plot.GROUP_COLORS)
    for i in range(len(fmap.layers)):
        assert sum(t.y[i] for t in fig.data) == pytest.approx(1.0)
    assert plot.score_distributions(fmap).data


def test_chain_lengths_count_the_planted_chain(planted):
    from tl_featureflow.synthetic import planted_chain_bank

    tracer, _ = planted
    fmap = tracer.flow_map(progress=False)
    truth = planted_chain_bank()[1]             # 0/res/3 -(0.9)- 1/res/7 -(0.6)- 2/res/1 -(0.3)- 3/res/5
    lengths = fmap.chain_lengths(0.5)
    assert [int(lengths[layer][int(ref.split("/")[-1])]) for layer, ref in enumerate(truth.chain) if layer in lengths
            ] == [0, 1, 2, 0][4 - len(lengths):]
    fig = plot.chain_lengths(fmap)
    assert [t.name for t in fig.data] == [name for name, *_ in plot.CHAIN_BUCKETS]
    for i, layer in enumerate(fmap.layers):
        assert sum(t.y[i] for t in fig.data) == pytest.approx(1.0)
        two = next(t for t in fig.data if t.name == "2").y[i]
        assert two == pytest.approx(float((lengths[layer] == 2).float().mean()))
    with pytest.raises(ff.FeatureFlowError, match="FlowMap"):
        plot.chain_lengths(object())


def _report():
    rows = [ValidationRow(0, 1, "2/res/1", "top1", "RES", 2.0, 0.0, 0.0, ["1/res/7"]),
            ValidationRow(0, 1, "2/res/1", "random", "RES", 2.0, 1.0, 0.0, ["1/res/3"]),
            ValidationRow(0, 2, "2/res/4", "top1", "MLP", 1.0, 0.5, 0.0, ["2/mlp/1"]),
            ValidationRow(0, 1, "2/res/1", "top1", "RES", 2.0, 1.5, 0.5, ["1/res/7"])]
    counts = {"2": {"top1": {"RES": 3, "MLP": 1}}}
    return ValidationReport(rows, counts, {"r": 0.0})


def test_validation_figures():
    report = _report()
    fig = plot.validation(report)
    assert list(fig.data[0].x) == ["random", "top1"] and list(fig.data[0].y) == [0.0, 0.5]
    assert list(fig.data[1].y) == pytest.approx([0.5, 0.75])
    assert len(plot.validation(report, by_group=True).data) == 4
    sweep = plot.r_sweep(report)
    assert len(sweep.data) == 1 and list(sweep.data[0].x) == [0.0, 0.5]
    comp = plot.group_composition(report)
    assert len(comp.data) == 8 and comp.data[1].y[0] == pytest.approx(0.75)


def test_steering_figure():
    rows = [SweepRow("baseline", None, 0.0, "add", 0, "", [], {"score": 0.1}),
            *[SweepRow(m, 3, s, "add", 0, "", [], {"score": s / 10}) for m in ("single", "cumulative")
              for s in (1.0, 2.0)]]
    fig = plot.steering(SteeringSweep(rows, SweepSettings(op="add", scale="unit")))
    assert sorted(t.name for t in fig.data) == ["cumulative L3", "single L3"]
    assert list(fig.data[0].y) == [0.1, 0.2]


def test_html_embeds_plotly_js(planted, tmp_path):
    _, graph = planted
    path = plot.write_html(plot.flow_graph(graph), tmp_path / "flow.html")
    html = path.read_text()
    assert "plotly.js v" in html or "Plotly" in html
    assert '<script src="http' not in html and len(html) > 1_000_000    # the library itself is inside
    assert str(graph.seed).replace("/", "\\u002f") in html     # JSON-escaped in the figure data


def test_flow_graph_stays_readable_at_30_layers():
    """A chain through 30 layers (res, mlp, att everywhere): one tick per layer, lanes apart, nothing overlaps."""
    tracer = ff.FlowTracer(random_bank(range(30), d_sae=16, d_model=8))
    graph = tracer.trace("15/res/0", t_res=0.0, t_module=0.0)
    assert {n.ref.layer for n in graph.nodes} == set(range(30))
    fig = plot.flow_graph(graph)
    assert list(fig.layout.xaxis.tickvals) == list(range(30))
    points = {(round(x, 3), round(y, 3)) for t in fig.data if t.mode == "markers+text" for x, y in zip(t.x, t.y, strict=False)}
    assert len(points) == len(graph.nodes)                      # no two nodes drawn on the same spot
    res = next(t for t in fig.data if t.name == "RES")
    assert set(res.y) == {plot.LANES["res"]} and len(res.x) == 30


def test_every_public_name_resolves_and_plot_is_reachable_from_the_package():
    for name in ff.__all__:
        assert getattr(ff, name) is not None, name
    assert ff.plot.flow_graph is plot.flow_graph
    with pytest.raises(AttributeError, match="no attribute 'plots'"):
        ff.plots  # noqa: B018


def _one_node_graph():
    bank, truth = planted_chain_bank()
    graph = ff.FlowTracer(bank).trace(truth.chain[2], t_res=0.999, t_module=0.999)
    assert len(graph.nodes) == 1 and not graph.edges          # the seed alone
    return graph


def test_every_figure_says_so_on_empty_input():
    """A graph of one node, a sweep without steered rows, a report without rows: each builder returns a
    figure with a message instead of traces plotly.js cannot draw (a Sankey with no links throws)."""
    graph = _one_node_graph()
    assert plot.flow_graph(graph).data                           # the node itself is drawn
    empty_report = ValidationReport([], {}, {"r": 0.0})
    baseline_only = SteeringSweep([SweepRow("baseline", None, 0.0, "add", 0, "", [], {"score": 0.1})],
                                  SweepSettings(op="add", scale="unit"))
    figures = {"sankey": plot.flow_sankey(graph), "validation": plot.validation(empty_report),
               "by group": plot.validation(empty_report, by_group=True), "r sweep": plot.r_sweep(empty_report),
               "groups": plot.group_composition(empty_report),
               "steering": plot.steering(baseline_only), "empty sweep": plot.steering(SteeringSweep([], SweepSettings(scale="unit")))}
    for name, fig in figures.items():
        assert not any(t.type == "sankey" or len(getattr(t, "x", None) or []) for t in fig.data), name
        assert len(fig.layout.annotations) >= 1 and fig.layout.annotations[-1].text, name
    assert "no edges" in figures["sankey"].layout.annotations[0].text
    assert plot.flow_sankey(planted_chain_graph()).data[0].type == "sankey"   # graphs with edges keep their Sankey


def planted_chain_graph():
    bank, truth = planted_chain_bank()
    return ff.FlowTracer(bank).trace(truth.chain[2], t_res=0.25, t_module=0.15)


def test_report_graph_section_tables_the_seed_choice_and_drops_a_silent_lens(planted):
    from dataclasses import replace

    from tl_featureflow.viz.html import _graph_section

    _, graph = planted
    info = {"feature": str(graph.seed), "score": 0.52, "theme_mean": 3.1, "chosen_by": "theme vs neutral contrast",
            "probe": [{"feature": "9/res/9", "score": 0.2, "behavioural": 0.3, "coherence": 0.6},
                      {"feature": str(graph.seed), "score": 0.4, "behavioural": 0.5, "coherence": 0.8}]}
    silent = replace(graph, nodes=[replace(n, lens=None) for n in graph.nodes])
    text = _graph_section(silent, "planted", info, set()).text
    assert "<td>chosen by</td><td>theme vs neutral contrast</td>" in text and "probe:" not in text and "{" not in text
    assert f"<td>▶ {graph.seed}</td>" in text and "<td>9/res/9</td>" in text
    assert "No logit-lens column" in text
    assert "logit lens</th>" not in _graph_section(silent, "planted", info, set()).tables[0]
    loud = replace(graph, nodes=[replace(n, lens="'x' 'y'") for n in graph.nodes])
    assert "logit lens</th>" in _graph_section(loud, "planted", info, set()).tables[0]

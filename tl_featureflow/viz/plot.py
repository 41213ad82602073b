"""Plotly figures of feature flow results: result objects in, ``go.Figure`` out, no models.

>>> from tl_featureflow.flow.tracer import FlowTracer
>>> from tl_featureflow.synthetic import planted_chain_bank
>>> fig = flow_graph(FlowTracer(planted_chain_bank()[0]).trace("2/res/1"))
>>> type(fig).__name__                     # fig.show() in a notebook
'Figure'
>>> import tempfile
>>> write_html(fig, tempfile.mkdtemp() + "/flow.html").stat().st_size > 3_000_000   # plotly.js inside: offline
True

Builders: :func:`flow_graph`, :func:`flow_sankey`, :func:`score_distributions`,
:func:`group_composition`, :func:`validation`, :func:`r_sweep`, :func:`steering`, and
:func:`feature_card` (HTML, not a figure: a feature's contexts, histogram and neighbours).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from tl_featureflow._files import atomic_write_text
from tl_featureflow.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_featureflow.saes.bank import SAEBank

__all__ = ["flow_graph", "flow_sankey", "score_distributions", "group_composition", "validation", "r_sweep",
           "steering", "feature_card", "chain_lengths", "write_html", "to_html", "SITE_COLORS", "LANES",
           "CHAIN_BUCKETS"]

SITE_COLORS = {"res": "#1f77b4", "mlp": "#2ca02c", "att": "#d62728"}
LANES = {"att": 1.0, "res": 0.0, "mlp": -1.0}     # y of each site's lane in flow_graph
GROUP_COLORS = {"translated": "#1f77b4", "processed": "#9467bd", "newborn": "#2ca02c", "unexplained": "#7f7f7f"}
_EDGE_SCALE = "Viridis"


def _nothing_to_show(fig: go.Figure, message: str) -> go.Figure:
    """``fig`` with ``message`` in its middle and no axes: what a builder returns for empty input
    (a graph of one node, a sweep or report with no rows), so that a report of a run that found
    little still renders (plotly.js throws on a Sankey with no links)."""
    fig.add_annotation(text=html.escape(message), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 14, "color": "#555"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(template="plotly_white")
    return fig


def _node_hover(node: Any) -> str:
    lines = [f"<b>{node.ref}</b> ({node.role})"]
    for site in ("res", "mlp", "att"):
        value = getattr(node, f"s_{site}", None)
        if value is not None:
            lines.append(f"s({site.upper()}) = {value:.3f}")
    if node.label:
        lines.append(f"fires on: {html.escape(node.label)}")
    lens = getattr(node, "lens", None)
    if lens and lens != node.label:
        lines.append(f"logit lens: {html.escape(lens)}")
    return "<br>".join(lines)


def _node_text(node: Any) -> str:
    """A node's caption: its index and the tokens it fires on most (up to three, stripped, from
    the first part of its label), e.g. ``"249 LORD·God·hath"``; whitespace tokens show as ``␣``.

    >>> from types import SimpleNamespace as N
    >>> _node_text(N(ref=N(index=723), label="' ·  LORD ·   — …the [LORD] said"))
    "723 '·LORD·␣"
    """
    if not node.label:
        return str(node.ref.index)
    tokens = [t.strip() or "␣" for t in node.label.split(" — ")[0].split(" · ")[:3]]
    return f"{node.ref.index} {_short('·'.join(tokens), 18)}"


def _short(label: str, n: int = 32) -> str:
    """The first part of a label (the tokens a feature fires on), cut to ``n`` characters."""
    head = label.split(" — ")[0]
    return head if len(head) <= n else head[: n - 1] + "…"


def _positions(graph: Any) -> dict[Any, tuple[float, float]]:
    """x = layer (module nodes a little left of res), y = the site's lane, spread within a cell."""
    cells: dict[tuple[int, str], list[Any]] = {}
    for node in graph.nodes:
        cells.setdefault((node.ref.layer, node.ref.site), []).append(node.ref)
    pos = {}
    for (layer, site), refs in cells.items():
        for i, ref in enumerate(sorted(refs)):
            offset = (i - (len(refs) - 1) / 2) * 0.35
            x = layer - (0.3 if site != "res" else 0.0)
            pos[ref] = (x, LANES[site] + offset)
    return pos


def flow_graph(graph: Any, *, title: str | None = None, height: int = 420) -> go.Figure:
    """A layered node-link figure of a :class:`~tl_featureflow.flow.graph.FlowGraph`.

    x is the layer; res, mlp and att features sit in their own lanes; edges point along
    the forward pass, with width and colour by cosine. One trace per edge (hover shows
    the cosine) and one node trace per site (hover shows the feature, its scores and
    label). The seed is drawn larger with a black outline.
    """
    pos = _positions(graph)
    fig = go.Figure()
    for edge in graph.edges:
        (x0, y0), (x1, y1) = pos[edge.src], pos[edge.dst]
        color = sample_colorscale(_EDGE_SCALE, [min(max(edge.score, 0.0), 1.0)])[0]
        fig.add_trace(go.Scatter(
            x=[x0, (x0 + x1) / 2, x1], y=[y0, (y0 + y1) / 2, y1], mode="lines",
            line={"width": 1 + 6 * max(edge.score, 0.0), "color": color}, showlegend=False,
            hoverinfo="text", text=[f"{edge.src} → {edge.dst}: cos {edge.score:.3f}"] * 3, name="edge"))
    for site in ("res", "mlp", "att"):
        nodes = [n for n in graph.nodes if n.ref.site == site]
        if not nodes:
            continue
        fig.add_trace(go.Scatter(
            x=[pos[n.ref][0] for n in nodes], y=[pos[n.ref][1] for n in nodes], mode="markers+text",
            name=site.upper(), text=[_node_text(n) for n in nodes], textposition="top center",
            hovertext=[_node_hover(n) for n in nodes], hoverinfo="text", customdata=[str(n.ref) for n in nodes],
            marker={"size": [20 if n.ref == graph.seed else 13 for n in nodes], "color": SITE_COLORS[site],
                    "line": {"width": [3 if n.ref == graph.seed else 1 for n in nodes], "color": "black"}}))
    layers = sorted({n.ref.layer for n in graph.nodes})
    fig.update_layout(
        title=title or f"Flow of {graph.seed} (layers {graph.span[0]}-{graph.span[1]})", height=height,
        xaxis={"title": "layer", "tickmode": "array", "tickvals": layers, "showgrid": True},
        yaxis={"tickmode": "array", "tickvals": list(LANES.values()), "ticktext": [s.upper() for s in LANES],
               "range": [-1.8, 1.8], "zeroline": False},
        hovermode="closest", template="plotly_white", legend={"orientation": "h", "y": -0.2})
    return fig


def flow_sankey(graph: Any, *, title: str | None = None) -> go.Figure:
    """The same flow as a Sankey diagram: link value = cosine, nodes coloured by site.

    A graph without edges (its seed alone) has no flow to draw: the figure says so.
    """
    if not graph.edges:
        fig = go.Figure()
        fig.update_layout(title=title or f"Flow of {graph.seed} (Sankey)")
        return _nothing_to_show(fig, f"{len(graph.nodes)} feature(s), no edges: nothing flows above the "
                                     f"thresholds (t_res {graph.t_res}, t_module {graph.t_module})")
    refs = [n.ref for n in graph.nodes]
    index = {ref: i for i, ref in enumerate(refs)}
    labels = [f"{r}" + (f" ({_short(graph.node(r).label)})" if graph.node(r).label else "") for r in refs]
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node={"label": labels, "color": [SITE_COLORS[r.site] for r in refs], "pad": 12,
              "customdata": [_node_hover(graph.node(r)) for r in refs],
              "hovertemplate": "%{customdata}<extra></extra>"},
        link={"source": [index[e.src] for e in graph.edges], "target": [index[e.dst] for e in graph.edges],
              "value": [max(e.score, 1e-3) for e in graph.edges],
              "customdata": [f"{e.src} → {e.dst}: cos {e.score:.3f}" for e in graph.edges],
              "hovertemplate": "%{customdata}<extra></extra>"}))
    fig.update_layout(title=title or f"Flow of {graph.seed} (Sankey)", template="plotly_white")
    return fig


def _scores_by_layer(source: Any, layers: Iterable[int] | None) -> dict[int, Any]:
    """``layer -> LayerScores`` from a FlowMap, or from LayerScores given one by one."""
    if hasattr(source, "layer_scores"):                                   # a FlowMap
        chosen = source.layers if layers is None else list(layers)
        return {layer: source[layer] for layer in chosen}
    if hasattr(source, "scores") and callable(source.scores):             # a FlowTracer: computes, so not here
        raise InvalidArgumentError("plots take result objects: pass tracer.flow_map() or "
                                   "[tracer.scores(layer) for layer in layers], not the FlowTracer")
    items = list(source.values()) if isinstance(source, dict) else list(source)
    if not items or not all(hasattr(item, "layer") and hasattr(item, "indices") for item in items):
        raise InvalidArgumentError(f"expected a FlowMap or LayerScores, got {type(source).__name__}")
    wanted = None if layers is None else set(layers)
    return {item.layer: item for item in items if wanted is None or item.layer in wanted}


def score_distributions(source: Any, layers: Iterable[int] | None = None, *, title: str | None = None) -> go.Figure:
    """Box plots of s(RES), s(MLP), s(ATT) per layer, from a FlowMap or LayerScores
    (``[tracer.scores(layer) for layer in layers]``)."""
    fig = go.Figure()
    data: dict[str, tuple[list[int], list[float]]] = {s: ([], []) for s in ("res", "mlp", "att")}
    for layer, scores in sorted(_scores_by_layer(source, layers).items()):
        for site in data:
            s = scores.s(site)
            if s is not None:
                values = s.float().cpu().tolist()
                data[site][0].extend([layer] * len(values))
                data[site][1].extend(values)
    for site, (xs, ys) in data.items():
        if xs:
            fig.add_trace(go.Box(x=xs, y=ys, name=f"s({site.upper()})", marker_color=SITE_COLORS[site],
                                 boxpoints=False))
    fig.update_layout(title=title or "Predecessor scores per layer", boxmode="group", template="plotly_white",
                      xaxis_title="layer", yaxis_title="max cosine with the predecessor site")
    return fig if fig.data else _nothing_to_show(fig, "no predecessor scores")


def group_composition(source: Any, *, method: str = "top1", title: str | None = None) -> go.Figure:
    """Share of each group per layer (the paper's figure 3 analogue), stacked bars.

    From a FlowMap: the cosine groups (translated / processed / newborn / unexplained).
    From a ValidationReport: the 8 activation groups of ``method``.
    """
    if hasattr(source, "layer_scores"):
        counts = {str(k): v for k, v in source.groups().items()}
        groups = list(GROUP_COLORS)
        kind = "cosine groups"
    elif hasattr(source, "group_counts"):
        counts = {layer: by_method.get(method, {}) for layer, by_method in source.group_counts.items()}
        from tl_featureflow.causal.results import ACTIVATION_GROUPS

        groups = list(ACTIVATION_GROUPS)
        kind = f"activation groups ({method})"
    else:
        raise InvalidArgumentError(f"expected a FlowMap or ValidationReport, got {type(source).__name__}")
    layers = sorted(counts, key=int)
    fig = go.Figure()
    for group in groups:
        shares = [counts[layer].get(group, 0) / max(sum(counts[layer].values()), 1) for layer in layers]
        fig.add_trace(go.Bar(x=[str(layer) for layer in layers], y=shares, name=group,
                             marker_color=GROUP_COLORS.get(group)))
    fig.update_layout(barmode="stack", title=title or f"Group composition per layer: {kind}",
                      xaxis_title="layer", yaxis={"title": "share of features", "tickformat": ".0%"},
                      template="plotly_white")
    return fig if layers else _nothing_to_show(fig, f"no {kind} to show")


#: Chain-length buckets of :func:`chain_lengths` (layers back at or above ``t_res``).
CHAIN_BUCKETS: tuple[tuple[str, int, int], ...] = (("0 (no res predecessor)", 0, 0), ("1", 1, 1), ("2", 2, 2),
                                                   ("3-4", 3, 4), ("5-8", 5, 8), ("9+", 9, 10 ** 9))


def chain_lengths(fmap: Any, *, t_res: float = 0.5, title: str | None = None) -> go.Figure:
    """Per layer, the share of res features whose top-1 residual chain goes back 0, 1, 2, ...
    layers with every step at or above ``t_res`` (:meth:`FlowMap.chain_lengths`), stacked bars.

    >>> from tl_featureflow.flow.tracer import FlowTracer
    >>> from tl_featureflow.synthetic import planted_chain_bank
    >>> fig = chain_lengths(FlowTracer(planted_chain_bank()[0]).flow_map(progress=False))
    >>> [trace.name for trace in fig.data][:3]
    ['0 (no res predecessor)', '1', '2']
    """
    if not hasattr(fmap, "chain_lengths"):
        raise InvalidArgumentError(f"expected a FlowMap, got {type(fmap).__name__}")
    lengths = fmap.chain_lengths(t_res)
    layers = sorted(lengths)
    fig = go.Figure()
    for name, low, high in CHAIN_BUCKETS:
        shares = [float(((lengths[x] >= low) & (lengths[x] <= high)).float().mean()) for x in layers]
        fig.add_trace(go.Bar(x=[str(x) for x in layers], y=shares, name=name))
    fig.update_layout(barmode="stack", title=title or f"Residual chain length per layer (t_res {t_res:g})",
                      xaxis_title="layer", yaxis={"title": "share of features", "tickformat": ".0%"},
                      legend_title="layers back", template="plotly_white")
    return fig if layers else _nothing_to_show(fig, "no layers with res scores")


def validation(report: Any, *, by_group: bool = False, title: str | None = None) -> go.Figure:
    """Success rate and mean activation change by method (or by method and group)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("success rate", "mean activation change"))
    if by_group:
        summary = report.summary("method,group")
        methods = sorted({k.split(" / ")[0] for k in summary})
        for method in methods:
            keys = [k for k in summary if k.startswith(method + " / ")]
            groups = [k.split(" / ", 1)[1] for k in keys]
            for col, metric in ((1, "success_rate"), (2, "activation_change")):
                fig.add_trace(go.Bar(x=groups, y=[summary[k][metric] for k in keys], name=method,
                                     legendgroup=method, showlegend=col == 1), row=1, col=col)
    else:
        summary = report.summary("method")
        methods = list(summary)
        for col, metric in ((1, "success_rate"), (2, "activation_change")):
            fig.add_trace(go.Bar(x=methods, y=[summary[m][metric] for m in methods], name=metric,
                                 text=[f"{summary[m][metric]:.2f}" for m in methods], textposition="outside",
                                 hovertext=[f"{m}: n = {summary[m]['n']}" for m in methods]), row=1, col=col)
    fig.update_layout(title=title or "Deactivation: does removing the matched predecessor remove the target?",
                      barmode="group", template="plotly_white", showlegend=by_group)
    fig.update_yaxes(range=[0, 1.1])
    return fig if summary else _nothing_to_show(fig, "no validation rows (no active targets with matches)")


def r_sweep(report: Any, methods: Sequence[str] | None = None, *, title: str | None = None) -> go.Figure:
    """Mean activation change of the target against the rescaling factor r, per method."""
    methods = methods or sorted({row.method for row in report.rows})
    fig = go.Figure()
    for method in methods:
        sweep = report.r_sweep(method)
        if len(sweep) > 1:
            fig.add_trace(go.Scatter(x=list(sweep), y=list(sweep.values()), mode="lines+markers", name=method))
    fig.update_layout(title=title or "Activation change vs r", xaxis_title="r (rescaling of the predecessor)",
                      yaxis_title="mean activation change 1 - z_new / z_old", template="plotly_white")
    return fig if fig.data else _nothing_to_show(fig, "no method was run at more than one r")


def steering(sweep: Any, metric: str = "score", *, title: str | None = None) -> go.Figure:
    """``metric`` vs strength, one line per (mode, layer); the unsteered baseline dashed."""
    table = sweep.summary(metric)
    fig = go.Figure()
    lines: dict[tuple[str, int | None], list[tuple[float, float]]] = {}
    for setting, value in table.items():
        if setting.mode != "baseline":
            lines.setdefault((setting.mode, setting.layer), []).append((setting.strength, value))
    for (mode, layer), points in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        points.sort()
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                 name=f"{mode} L{layer}",
                                 line={"dash": "solid" if mode == "cumulative" else "dot"}))
    base = [v for k, v in table.items() if k.mode == "baseline"]
    if base:
        fig.add_hline(y=base[0], line_dash="dash", line_color="gray", annotation_text="unsteered")
    op = sweep.settings.op
    fig.update_layout(title=title or f"Steering {sweep.meta.get('seed_feature', '')}: {metric} vs "
                                     f"{'r' if op == 'rescale' else 'strength'}",
                      xaxis_title="r" if op == "rescale" else "strength", yaxis_title=metric, template="plotly_white")
    return fig if lines else _nothing_to_show(fig, "no steered settings in this sweep")


def feature_card(card_or_ref: Any, *, model: HookedTransformer | None = None, bank: SAEBank | None = None,
                 tokens: Any = None, contexts: Any = None, tracer: Any = None) -> Any:
    """A feature's card (:class:`~tl_featureflow.viz.cards.CardView`): renders inline in a notebook,
    ``.save(path)`` writes one offline HTML page.

    Pass a :class:`~tl_featureflow.flow.cards.FeatureCard`, or a feature and what computes its
    card (``model`` and ``bank``, or a ``tracer``; contexts from ``contexts``, else from one pass
    over ``tokens``, else the bank's cached held-out contexts): the one builder here that
    computes, by delegating to :func:`tl_featureflow.flow.cards.build_card`.
    """
    from tl_featureflow.flow.cards import FeatureCard, build_card
    from tl_featureflow.viz.cards import CardView

    if isinstance(card_or_ref, FeatureCard):
        return CardView(card_or_ref)
    return CardView(build_card(card_or_ref, model=model, bank=bank, tokens=tokens, contexts=contexts, tracer=tracer))


def to_html(fig: go.Figure, *, include_plotlyjs: bool = True, div_id: str | None = None) -> str:
    """An HTML fragment (a div) of ``fig``; with plotly.js embedded unless told otherwise."""
    return fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs, div_id=div_id)


def write_html(fig: go.Figure, path: str | Path) -> Path:
    """A standalone HTML page of ``fig`` with plotly.js embedded (no network needed), written atomically."""
    path = Path(path)
    atomic_write_text(path, fig.to_html(full_html=True, include_plotlyjs=True))
    return path

"""One self-contained, offline HTML report of a run: figures, tables, settings and versions.

A *run folder* holds the saved results of one run (what ``featureflow demo`` writes;
every file is optional)::

    run.json              settings, seeds and notes of the run
    graphs/*.json         FlowGraphs (FlowGraph.save)
    flowmap/              a FlowMap (FlowMap.save)
    validation.json       a ValidationReport
    steering/*.json       SteeringSweeps (already scored, or not)
    report_cards/*.json   steering ReportCards (prompting vs one feature vs the flow graph)
    cards.json            FeatureCards of the graphs' features (a list of FeatureCard.to_dict())

:func:`report_from_dir` turns it into one HTML file with plotly.js embedded once, so
it opens with no network (``featureflow report RUN_DIR``).
"""

from __future__ import annotations

import html
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tl_featureflow._files import atomic_write_text
from tl_featureflow.errors import CacheError
from tl_featureflow.rundir import RunDir
from tl_featureflow.viz import plot
from tl_featureflow.viz.cards import CARD_CSS, CARD_SCRIPT, card_id, cards_html
from tl_featureflow.viz.tables import Raw, table_html

__all__ = ["Section", "Raw", "table_html", "render_report", "report_from_dir", "versions"]

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f6f8; }
.note { color: #555; }
.figure { margin: 1em 0; }
code, pre { background: #f6f8fa; padding: 2px 4px; }
"""


@dataclass
class Section:
    """A titled part of the report: text (HTML), tables (HTML) and plotly figures."""

    title: str
    text: str = ""
    figures: list[Any] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)


def versions() -> dict[str, str]:
    """Versions of Python and the packages that produced a result."""
    out = {"python": platform.python_version()}
    for name in ("tl_featureflow", "torch", "transformer_lens", "sae_lens", "plotly", "transformers"):
        try:
            out[name] = metadata.version(name)     # importlib.metadata normalises - and _
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def render_report(title: str, sections: Sequence[Section], *, settings: dict[str, Any] | None = None,
                  path: str | Path) -> Path:
    """Write the report to ``path`` (atomically) and return the path."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}{CARD_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by tl_featureflow.</p>"]
    toc = "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections))
    parts.append(f"<ul>{toc}</ul>")
    first_figure = True
    n_fig = 0
    for i, section in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(section.title)}</h2>{section.text}")
        parts.extend(section.tables)
        for fig in section.figures:
            parts.append("<div class='figure'>" + plot.to_html(fig, include_plotlyjs=first_figure,
                                                               div_id=f"figure-{n_fig}") + "</div>")
            first_figure = False
            n_fig += 1
    settings_rows = [{"setting": k, "value": json.dumps(v) if not isinstance(v, str) else v}
                     for k, v in (settings or {}).items()]
    parts.append("<h2 id='settings'>Settings and versions</h2>" + table_html(settings_rows)
                 + table_html([{"package": k, "version": v} for k, v in versions().items()]))
    parts.append(CARD_SCRIPT + "</body></html>")
    path = Path(path)
    atomic_write_text(path, "\n".join(parts))
    return path


def _graph_section(graph: Any, name: str, info: dict[str, Any], carded: set[str]) -> Section:
    def feature(ref: Any) -> Any:
        return Raw(f"<a href='#{card_id(ref)}'>{html.escape(str(ref))}</a>") if card_id(ref) in carded else str(ref)

    lens = any(n.lens for n in graph.nodes)      # the tracer keeps a lens only where it beats random directions
    rows = [{"feature": feature(n.ref), "role": n.role, "s(RES)": n.s_res, "s(MLP)": n.s_mlp, "s(ATT)": n.s_att,
             "fires on": n.label, **({"logit lens": n.lens} if lens else {})} for n in graph.nodes]
    text = f"<p>Seed <code>{graph.seed}</code>, {len(graph.nodes)} features, {len(graph.edges)} edges, " \
           f"span layers {graph.span[0]}-{graph.span[1]} (t_res {graph.t_res}, t_module {graph.t_module}).</p>"
    text += _seed_tables(info)
    if not lens:
        text += ("<p class='note'>No logit-lens column: no feature's top promoted token stands out further than "
                 "a random direction's does (99th percentile of 256), so the lens says nothing here.</p>")
    if info.get("contexts"):
        text += ("<p class='note'>The seed's top contexts (why it was chosen):</p><ul>"
                 + "".join(f"<li><code>{html.escape(c)}</code></li>" for c in info["contexts"]) + "</ul>")
    if carded:
        text += "<p class='note'>Click a node (or a feature in the table) to open its card below.</p>"
    return Section(f"Flow graph: {name}", text, [plot.flow_graph(graph), plot.flow_sankey(graph)], [table_html(rows)])


_SEED_FACTS = {"chosen_by": "chosen by", "score": "contrast score", "theme_mean": "mean activation on the theme",
               "neutral_mean": "on neutral text", "on_theme": "top contexts on theme",
               "max_activation": "max activation"}


def _seed_tables(info: dict[str, Any]) -> str:
    """How the seed was chosen: its facts as a two-column table, then the steering probe's
    candidates (the chosen one marked)."""
    facts = [{"": label, "value": info[key]} for key, label in _SEED_FACTS.items() if info.get(key) is not None]
    out = table_html(facts) if facts else ""
    if info.get("probe"):
        probe = [{"candidate": ("▶ " if p["feature"] == info.get("feature") else "") + p["feature"],
                  "score": p["score"], "behavioural": p["behavioural"], "coherence": p["coherence"]}
                 for p in info["probe"]]
        out += "<p class='note'>The steering probe's candidates (▶ chosen):</p>" + table_html(probe)
    return out


def _cards_section(cards: list[Any]) -> Section:
    text = ("<p>What each feature of the flow graphs fires on: its strongest contexts in held-out text (the "
            "firing token outlined, every token shaded by the feature's activation on it), the histogram of its "
            "positive activations, the tokens its decoder promotes and suppresses (logit lens), its predecessors "
            "and successors by decoder cosine. Click a card to open it.</p>")
    return Section("Feature cards", text + cards_html(cards))


def _validation_section(report: Any) -> Section:
    summary = report.summary()
    rows = [{"method": m, "success rate": v["success_rate"], "activation change": v["activation_change"],
             "n": v["n"], "mean |loss change|": v.get("loss_change_abs")} for m, v in summary.items()]
    meta = report.meta
    text = ("<p>Deactivation experiment (method section 5): for active res targets, the matched predecessor(s) "
            "are rescaled by r at the same token and the target's new activation is read. Success = the target "
            "drops to zero.</p>" + "<p class='note'>" + html.escape(
                ", ".join(f"{k}: {meta[k]}" for k in ("layers", "n_texts", "r", "methods") if k in meta)) + "</p>")
    figures = [plot.validation(report), plot.validation(report, by_group=True), plot.group_composition(report)]
    if any(len(report.r_sweep(m)) > 1 for m in {r.method for r in report.rows}):
        figures.append(plot.r_sweep(report))
    return Section("Causal validation", text, figures, _table1_tables(report) + [table_html(rows)])


def _table1_tables(report: Any) -> list[str]:
    """Table 1 on the paper's target set beside the paper's numbers, and the attribution summary."""
    from tl_featureflow.causal.protocol import attribution_summary
    from tl_featureflow.causal.results import PAPER_TABLE1

    if not {"exhaustive_single", "pearson", "attribution"} & {row.method for row in report.rows}:
        return []
    table = report.table1()
    rows = [{"method": m, "success rate": v["success_rate"], "activation change": v["activation_change"], "n": v["n"],
             "paper: success": PAPER_TABLE1.get(m, {}).get("success_rate"),
             "paper: activation change": PAPER_TABLE1.get(m, {}).get("activation_change")} for m, v in table.items()]
    out = ["<h3>Table 1, the paper's way</h3><p class='note'>Targets whose top-1 cosine or Pearson group is a single "
           f"site ({len(report.paper_targets())}); the same targets for every method; exhaustive_single is the paper's "
           "exhaustive search (the best single feature over all sites).</p>", table_html(rows)]
    per_layer = report.table1_by_layer()
    if len(per_layer) > 1:
        out.append("<p class='note'>Per layer: success rate (each layer's own target set).</p>")
        out.append(table_html([{"method": m, **{f"layer {layer}": t[m]["success_rate"] for layer, t in per_layer.items()
                                                if m in t}} for m in table]))
    summary = attribution_summary(report)
    if summary:
        out.append(f"<h3>Where the targets' pre-activations come from ({summary['n']} targets)</h3>")
        out.append(table_html([{"part": k, "mean share": v} for k, v in summary["shares"].items()]))
        out.append(table_html([{"site": site, "top-1 match is the largest contributor": r["rank1"],
                                "match not active": r["inactive"], "median rank when active": r["median_rank"],
                                "largest contributor sits here": summary["best_site"].get(site)}
                               for site, r in summary["top1_rank"].items()]))
    return out


def _steering_section(sweep: Any, name: str) -> Section:
    meta, settings = sweep.meta, sweep.settings
    text = (f"<p>{'Suppression (rescale by r)' if settings.op == 'rescale' else 'Promotion (add)'} of "
            f"<code>{html.escape(str(meta.get('seed_feature')))}</code> along its flow graph; prompt "
            f"<code>{html.escape(str(settings.prompt))}</code>, {settings.max_new_tokens} new tokens, "
            f"{settings.samples} samples per setting, top_p {settings.top_p}, temperature "
            f"{settings.temperature}.</p>")
    scored = bool(sweep.rows) and all("score" in r.scores for r in sweep.rows)
    figures, tables = [], []
    if scored:
        judge = meta.get("judge", {})
        text += (f"<p class='note'>Scores from the offline judge (a proxy for the paper's LLM judge), topic "
                 f"<i>{html.escape(str(judge.get('topic')))}</i>: "
                 f"{'(1 - behavioural)' if judge.get('suppress') else 'behavioural'} x coherence.</p>")
        figures = [plot.steering(sweep), plot.steering(sweep, "behavioural"), plot.steering(sweep, "coherence")]
        rows = []
        for mode in ("single", "cumulative"):
            if any(r.mode == mode for r in sweep.rows):
                setting, value = sweep.best(mode=mode)
                rows.append({"mode": mode, "best layer": setting.layer, "strength": setting.strength,
                             "mean score": value})
        tables.append(table_html(rows))
    examples = []
    settings = [sweep.baseline()[0].setting] if sweep.baseline() else []
    if scored:
        settings += [sweep.best(mode=m)[0] for m in ("single", "cumulative") if any(r.mode == m for r in sweep.rows)]
    for setting in settings:
        row = next(r for r in sweep.rows if r.setting == setting)
        examples.append({"setting": f"{setting.mode} L{setting.layer} {setting.op} {setting.strength:g}"
                         if setting.mode != "baseline" else "baseline (unsteered)",
                         "generation": row.text, **({"score": row.scores.get("score")} if scored else {})})
    tables.append(table_html(examples))
    return Section(f"Steering: {name}", text, figures, tables)


_CARD_COLUMNS = {"method": "method", "layer": "layer", "strength": "strength", "score": "score (B x C)",
                 "concept": "concept", "fluency": "fluency", "ppl_ratio": "ppl ratio",
                 "neutral_concept": "neutral: concept", "neutral_fluency": "neutral: fluency",
                 "instruction": "neutral: instruction", "harmonic": "neutral: harmonic mean"}


def _report_card_section(cards: Sequence[Any]) -> Section:
    """The steering report cards: prompting vs the seed alone vs the flow graph, one table per theme."""
    first = cards[0].settings
    text = (f"<p>For each theme: the unsteered model, <b>prompting</b> (the unsteered model asked for the topic in "
            f"its prompt), the seed feature alone and its flow graph (single-layer and cumulative; constant, "
            f"exponential and linear schedules). Each method's layer and strength ({first.scale} units) are chosen "
            f"on {first.select_samples} sample(s) per setting, then measured on {first.samples} fresh samples of "
            f"<code>{html.escape(first.prompt)}</code> (the paper's score: behavioural x coherence; the perplexity "
            f"ratio to the unsteered model) and {first.neutral_samples} per neutral instruction "
            f"({len(first.neutral_prompts)}; concept, fluency, instruction relevance and AxBench's harmonic mean). "
            f"Scores from the offline judge, a proxy.</p>")
    tables = []
    for card in cards:
        rows = [{label: _blank_nan(getattr(r, key)) for key, label in _CARD_COLUMNS.items()} for r in card.rows]
        tables.append(f"<h3>{html.escape(card.theme)}: seed <code>{html.escape(str(card.meta.get('seed_feature')))}"
                      f"</code>, flow graph of {card.meta.get('graph_nodes')} features</h3>"
                      f"<p class='report-card-verdict'>{html.escape(card.verdict())}</p>"
                      + table_html(rows, floats="{:.2f}"))
    return Section("Steering report card", text, [], tables)


def _blank_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def report_from_dir(run_dir: str | Path, out: str | Path | None = None, *, title: str | None = None) -> Path:
    """Build the HTML report of a run folder (see the module docs); returns its path."""
    from tl_featureflow.causal.results import ValidationReport
    from tl_featureflow.flow.flowmap import FlowMap
    from tl_featureflow.flow.graph import FlowGraph
    from tl_featureflow.steer.report_card import ReportCard
    from tl_featureflow.steer.sweeps import SteeringSweep

    folder = RunDir(run_dir)
    run_dir = folder.root
    if not run_dir.is_dir():
        raise CacheError(f"no run folder at {run_dir}: expected the output folder of `featureflow demo` "
                         "(or of trace/validate/steer with --out)")
    run = folder.read_run()
    sections = []
    if run.get("summary"):
        sections.append(Section("Summary", "".join(f"<p>{html.escape(line)}</p>" for line in run["summary"])))
    seeds = run.get("seeds", {})
    cards = _read_cards(folder.cards)
    carded = {card_id(c.ref) for c in cards}
    for path in folder.graphs():
        sections.append(_graph_section(FlowGraph.load(path), path.stem, seeds.get(path.stem, {}), carded))
    if folder.flowmap.is_dir():
        fmap = FlowMap.load(folder.flowmap)
        sections.append(Section("Flow map", "<p>Predecessor scores and cosine groups of every res feature, and "
                                "how far back each feature's residual chain goes (top-1 matches at or above "
                                "t_res 0.5).</p>",
                                [plot.score_distributions(fmap), plot.group_composition(fmap),
                                 plot.chain_lengths(fmap)],
                                [table_html([{"layer": k, **v} for k, v in fmap.groups().items()])]))
    if folder.validation.is_file():
        sections.append(_validation_section(ValidationReport.load(folder.validation)))
    for path in folder.sweeps():
        sections.append(_steering_section(SteeringSweep.load(path), path.stem))
    card_paths = folder.report_cards()
    if card_paths:
        sections.append(_report_card_section([ReportCard.load(path) for path in card_paths]))
    if cards:
        sections.append(_cards_section(cards))
    if not sections:
        raise CacheError(f"{run_dir} holds no results (graphs/, flowmap/, validation.json, steering/)")
    return render_report(title or run.get("title", f"Feature flow report: {run_dir.name}"), sections,
                         settings=run.get("settings", {}), path=out or folder.report)


def _read_cards(path: Path) -> list[Any]:
    """The FeatureCards saved in a run folder (none when the file is missing)."""
    from tl_featureflow.flow.cards import load_cards

    return load_cards(path) if path.is_file() else []

"""The paper's Table-1 protocol in one call, and its tables as Markdown.

:func:`run_paper_protocol` validates at about 1/4, 1/2 and 3/4 of the model's depth
(where the bank covers res(L-1), res(L), mlp(L), att(L)), with the paper's methods
(top-1 cosine, top-1 Pearson from 100K training tokens, the exhaustive search over
single features) and ours (attribution, per-site exhaustive, random), an r sweep from
-2 to 3 and sampled LM-loss changes; features that never fire on held-out text are
excluded from cosine matching (and how often the unrestricted top-1 match is dead is
reported). :func:`table1_markdown` writes Table 1 beside the paper's numbers, the
per-group rates, the group shares per layer, the r sweep, the loss change and where
the targets' pre-activations come from. ``featureflow validate --paper`` runs both.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from tl_featureflow.causal.results import PAPER_TABLE1, TABLE1_METHODS, ValidationReport
from tl_featureflow.errors import BankError
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.presets import table1_layers

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_featureflow.distributed import Ranks

__all__ = ["paper_layers", "run_paper_protocol", "table1_markdown", "attribution_summary", "PAPER_METHODS",
           "PAPER_R"]

PAPER_METHODS: tuple[str, ...] = ("top1", "pearson", "exhaustive_single", "attribution", "exhaustive", "random")
#: The main r first (0: remove), then the sweep (the paper swept r from -2 to 3).
PAPER_R: tuple[float, ...] = (0.0, -2.0, -1.0, 0.5, 1.5, 2.0, 3.0)


def paper_layers(n_layers: int, bank: SAEBank) -> list[int]:
    """The layers at about 1/4, 1/2 and 3/4 of the depth that the bank covers (res(L-1), res(L), mlp(L), att(L))."""
    wanted = table1_layers(n_layers)
    covered = [layer for layer in wanted
               if all(key in bank for key in (("res", layer), ("res", layer - 1), ("mlp", layer), ("att", layer)))]
    if not covered:
        raise BankError(f"the paper's protocol runs at layers {wanted} (1/4, 1/2, 3/4 of {n_layers}), but the "
                        f"bank ({bank.describe()}) covers none of them with res(L-1), res(L), mlp(L) and att(L)")
    return covered


def run_paper_protocol(
    model: HookedTransformer,
    bank: SAEBank,
    tokens: Tensor,
    *,
    layers: Sequence[int] | None = None,
    tracer: Any = None,
    pearson_tokens: int | Tensor | None = None,
    pearson_source: str | None = None,
    alive: dict[Any, Tensor] | None = None,
    r: Sequence[float] = PAPER_R,
    loss_samples: int = 2,
    positions_per_text: int = 5,
    max_targets: int = 25,
    seed: int = 0,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> ValidationReport | None:
    """Validate the paper's way (see the module docs); returns the report (``report.table1()``).

    ``ranks`` (a torchrun process group, :func:`tl_featureflow.distributed.init`): the texts are shared
    out over the ranks (:func:`tl_featureflow.causal.sharded.validate`); every rank reads the live
    features and the Pearson matches (computed once, through the cache's lock, when they are cached) and
    rank 0 returns the merged report, equal to one process's row for row; the other ranks return None.

    ``pearson_tokens``: how many training tokens the correlations are estimated on (default
    100K, the paper's), or the token rows themselves; ``alive``: live-feature masks (default: features that fired on the bank's cached
    held-out contexts, :func:`~tl_featureflow.flow.contexts.feature_contexts`; needs the tokenizer).
    """
    from tl_featureflow.causal.experiment import validate
    from tl_featureflow.causal.pearson import DEFAULT_PEARSON_TOKENS, pearson_matches
    from tl_featureflow.flow.tracer import FlowTracer

    layers = list(layers) if layers is not None else paper_layers(model.cfg.n_layers, bank)
    tracer = tracer or FlowTracer(bank, model, contexts=None)
    if alive is None and getattr(model, "tokenizer", None) is not None:
        from tl_featureflow.flow.contexts import feature_contexts

        contexts = feature_contexts(model, bank, progress=progress)
        alive = contexts.alive()
    if isinstance(pearson_tokens, Tensor):
        pearson = pearson_matches(model, bank, layers, tokens=pearson_tokens, source=pearson_source, progress=progress)
    else:
        pearson = pearson_matches(model, bank, layers, n_tokens=pearson_tokens or DEFAULT_PEARSON_TOKENS,
                                  progress=progress)
    settings = dict(layers=layers, methods=PAPER_METHODS, r=list(r), positions_per_text=positions_per_text,
                    max_targets=max_targets, seed=seed, sweep_methods=("top1", "exhaustive_single"),
                    loss_samples=loss_samples, pearson=pearson, alive=alive, progress=progress)
    if ranks is None:
        report = validate(tracer, model, tokens, **settings)
    else:
        from tl_featureflow.causal import sharded

        report = sharded.validate(tracer, model, tokens, ranks, **settings)
        if report is None:
            return None
    report.meta["protocol"] = "paper (Table 1)"
    return report


def attribution_summary(report: ValidationReport) -> dict[str, Any]:
    """Where the sampled targets' pre-activations come from, and whether cosine's match carries it.

    ``shares``: mean over targets of each part / the target's pre-activation (the parts sum to 1):
    per site its active features, its decoder bias and its SAE error, and the res(L) SAE's own
    constant. Per site: ``rank1`` the share of targets whose top-1 cosine match is that site's
    largest contributor, ``inactive`` the share where the match is not active at all, and
    ``median_rank`` among targets where it is active. ``best_site``: how often the single largest
    contributor sits at each site.
    """
    records = [a for a in report.attributions if abs(a["pre"]) > 1e-6]
    if not records:
        return {}
    sites = ("res", "att", "mlp")
    shares = {"constant": statistics.fmean(a["constant"] / a["pre"] for a in records)}
    for site in sites:
        for part in ("features", "bias", "error"):
            if f"{site}_{part}" in records[0]:
                shares[f"{site} {part}"] = statistics.fmean(a[f"{site}_{part}"] / a["pre"] for a in records)
    ranks: dict[str, dict[str, float]] = {}
    for site in sites:
        values = [a[f"{site}_top1_rank"] for a in records if f"{site}_top1_rank" in a]
        if values:
            active = [v for v in values if v > 0]
            ranks[site] = {"rank1": sum(v == 1 for v in values) / len(values),
                           "inactive": sum(v == 0 for v in values) / len(values),
                           "median_rank": statistics.median(active) if active else float("nan"),
                           "median_active": statistics.median(a[f"{site}_active"] for a in records)}
    for site in sites:
        active = [a[f"{site}_top1_contribution"] / a["pre"] for a in records if a.get(f"{site}_top1_rank", 0) > 0]
        if site in ranks:
            ranks[site]["median_share_when_active"] = statistics.median(active) if active else float("nan")
    best = [a["best"].split(":")[0] for a in records if a.get("best")]
    best_share = [a["best_contribution"] / a["pre"] for a in records if "best_contribution" in a]
    return {"n": len(records), "shares": shares, "top1_rank": ranks,
            "best_site": {site: best.count(site) / len(best) for site in sites} if best else {},
            "best_share": statistics.median(best_share) if best_share else float("nan")}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table1_markdown(report: ValidationReport, *, command: str = "") -> str:
    """Table 1 (ours beside the paper's), per-group rates, group shares, r sweep, loss change, attribution."""
    names = {"top1": "top-1 cosine", "pearson": "top-1 Pearson", "exhaustive_single": "exhaustive (paper: best single feature)",
             "attribution": "attribution (ours: largest contributor)", "exhaustive": "exhaustive per site (ours, removes one per site)"}
    meta = report.meta
    lines = [f"Layers {meta.get('layers')}, {meta.get('n_texts')} held-out texts x {meta.get('positions_per_text')} "
             f"positions, up to {meta.get('max_targets')} targets each; bank {meta.get('bank')}; r = {meta.get('r')}.",
             ""]
    if command:
        lines += ["    " + command, ""]
    table = report.table1()
    n_targets = len(report.paper_targets())
    lines += [f"**Table 1** ({n_targets} targets whose top-1 cosine or Pearson group is a single site; the same "
              "targets for every method; a method without an active match counts as a failure):", "",
              "| method | success rate | activation change | n | paper: success | paper: activation change |",
              "|---|---|---|---|---|---|"]
    for method in TABLE1_METHODS:
        if method in table:
            row, paper = table[method], PAPER_TABLE1.get(method)
            lines.append(f"| {names[method]} | {_pct(row['success_rate'])} | {row['activation_change']:.3f} | "
                         f"{row['n']} | {_pct(paper['success_rate']) if paper else '-'} | "
                         f"{paper['activation_change'] if paper else '-'} |")
    by_group = report.table1(by_group=True)
    groups = ("RES", "MLP", "ATT")
    lines += ["", "By the target's top-1 cosine group (success rate, n):", "",
              "| method | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for method in TABLE1_METHODS:
        cells = [f"{_pct(by_group[k]['success_rate'])} ({by_group[k]['n']})" if (k := f"{method} / {g}") in by_group
                 else "-" for g in groups]
        if any(c != "-" for c in cells):
            lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
    per_layer = report.table1_by_layer()
    if len(per_layer) > 1:
        layers = list(per_layer)
        lines += ["", "Table 1 per layer (success rate, n; each layer's own target set):", "",
                  "| method | " + " | ".join(f"layer {layer}" for layer in layers) + " |", "|---|" + "---|" * len(layers)]
        for method in TABLE1_METHODS:
            cells = [f"{_pct(t[method]['success_rate'])} ({t[method]['n']})" if method in t else "-"
                     for t in per_layer.values()]
            if any(c != "-" for c in cells):
                lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Our broader table (every target with an active match of that method; groups of all kinds):", "",
              "| method | success rate | activation change | n | mean abs. loss change |", "|---|---|---|---|---|"]
    for method, row in report.summary().items():
        loss = row.get("loss_change_abs")
        lines.append(f"| {method} | {_pct(row['success_rate'])} | {row['activation_change']:.3f} | {row['n']} | "
                     f"{'-' if loss is None else f'{loss:.2e}'} |")
    lines += ["", "Group shares per layer (top-1 cosine, every sampled target):", "",
              "| layer | " + " | ".join(_GROUP_ORDER) + " |", "|---|" + "---|" * len(_GROUP_ORDER)]
    for layer, by_method in report.group_counts.items():
        counts = by_method.get("top1", {})
        total = max(sum(counts.values()), 1)
        lines.append(f"| {layer} | " + " | ".join(_pct(counts.get(g, 0) / total) for g in _GROUP_ORDER) + " |")
    for method in ("top1", "exhaustive_single"):
        sweep = report.r_sweep(method)
        if len(sweep) > 1:
            lines += ["", f"r sweep ({method}): mean activation change", "", "| r | " + " | ".join(f"{r:g}" for r in sweep)
                      + " |", "|---|" + "---|" * len(sweep),
                      "| change | " + " | ".join(f"{v:.3f}" for v in sweep.values()) + " |"]
    if meta.get("dead_top1"):
        lines += ["", "Share of res(L) features whose unrestricted top-1 cosine match never fires on held-out text "
                  "(matching above used live features only): " + "; ".join(
                      f"layer {layer}: " + ", ".join(f"{site} {_pct(v)}" for site, v in sites.items())
                      for layer, sites in meta["dead_top1"].items())]
    summary = attribution_summary(report)
    if summary:
        lines += ["", f"Where the targets' pre-activations come from ({summary['n']} sampled targets; mean share of "
                  "the pre-activation, the parts sum to 100%):", "", "| part | share |", "|---|---|"]
        lines += [f"| {part} | {_pct(value)} |" for part, value in summary["shares"].items()]
        lines += ["", f"The largest single contributor carries a median {_pct(summary['best_share'])} of a target's "
                  "pre-activation. Is the top-1 cosine match the feature that carries it? Per site:", "",
                  "| site | match is the largest contributor | match not active | median rank when active | "
                  "median share when active | active features (median) | largest single contributor sits here |",
                  "|---|---|---|---|---|---|---|"]
        for site, ranks in summary["top1_rank"].items():
            lines.append(f"| {site.upper()} | {_pct(ranks['rank1'])} | {_pct(ranks['inactive'])} | "
                         f"{ranks['median_rank']:g} | {_pct(ranks.get('median_share_when_active', float('nan')))} | "
                         f"{ranks['median_active']:g} | {_pct(summary['best_site'].get(site, 0.0))} |")
    return "\n".join(lines) + "\n"


_GROUP_ORDER = ("From nowhere", "RES", "MLP", "ATT", "RES & MLP", "RES & ATT", "MLP & ATT", "RES & MLP & ATT")

"""Feature cards drawn as HTML: top contexts shaded by activation, histogram, logit lens, neighbours.

Takes :class:`~tl_featureflow.flow.cards.FeatureCard` result objects. One card is a
``<details>`` element with id ``card-<layer>-<site>-<index>``; links between cards are
plain anchors, so a report of many cards works offline with no script, and a small
script (:data:`CARD_SCRIPT`) opens the card named in the URL (``report.html#card-14-res-249``)
and the card of a flow-graph node when it is clicked.

>>> from tl_featureflow.flow.cards import CardContext, FeatureCard
>>> from tl_featureflow.refs import FeatureRef
>>> card = FeatureCard(FeatureRef(2, "res", 1), label="God · Lord — …unto the [Lord]",
...                    contexts=[CardContext(("unto", " the", " Lord"), (0.0, 0.5, 2.0), 2, 2.0)])
>>> html = card_html(card)
>>> "id='card-2-res-1'" in html and "ff-fire" in html
True
>>> type(CardView(card)._repr_html_()).__name__     # renders inline in a notebook
'str'
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tl_featureflow._files import atomic_write_text
from tl_featureflow.viz.tables import Raw, table_html

__all__ = ["card_id", "card_html", "cards_html", "CardView", "CARD_CSS", "CARD_SCRIPT"]

CARD_CSS = """
.ff-card { border: 1px solid #ccd; border-radius: 6px; margin: .6em 0; padding: .3em .8em; background: #fff; }
.ff-card > summary { cursor: pointer; font-size: 1.02em; }
.ff-card.ff-target, .ff-card:target { box-shadow: 0 0 0 3px #1f77b4; }
.ff-ref { font-family: ui-monospace, monospace; font-weight: bold; margin-right: .5em; }
.ff-lens, .ff-stats { color: #555; font-size: .9em; margin: .3em 0; }
.ff-ctx { font-family: ui-monospace, monospace; font-size: .86em; margin: .15em 0; white-space: pre-wrap; }
.ff-tok { border-radius: 2px; }
.ff-fire { outline: 1.5px solid #b35900; font-weight: bold; }
.ff-act { display: inline-block; min-width: 3.5em; color: #888; }
.ff-card table { font-size: .85em; margin: .4em 0; }
.ff-hist rect { fill: #ff8c00; }
.ff-hist text { font-size: 10px; fill: #666; }
"""

CARD_SCRIPT = """
<script>
function ffOpenCard(id) {
  var el = document.getElementById(id);
  if (!el || !el.classList.contains('ff-card')) return false;
  el.open = true;
  document.querySelectorAll('.ff-target').forEach(function (x) { x.classList.remove('ff-target'); });
  el.classList.add('ff-target');
  el.scrollIntoView();
  return true;
}
function ffRefOf(point) {
  var found = null;
  [point.customdata, point.label, point.text, point.hovertext].forEach(function (v) {
    if (!found && typeof v === 'string') {
      var m = v.match(/-?\\d+\\/(res|mlp|att)\\/\\d+/);
      if (m) found = m[0];
    }
  });
  return found;
}
window.addEventListener('hashchange', function () { ffOpenCard(location.hash.slice(1)); });
window.addEventListener('load', function () {
  if (location.hash) ffOpenCard(location.hash.slice(1));
  document.querySelectorAll('.plotly-graph-div').forEach(function (gd) {
    if (!gd.on) return;
    gd.on('plotly_click', function (event) {
      var ref = event && event.points && event.points.length ? ffRefOf(event.points[0]) : null;
      if (ref && document.getElementById('card-' + ref.replace(/\\//g, '-'))) location.hash = 'card-' + ref.replace(/\\//g, '-');
    });
  });
});
</script>
"""


def card_id(ref: Any) -> str:
    """The HTML id of a feature's card: ``card-14-res-249``."""
    return "card-" + str(ref).replace("/", "-")


def _piece(text: str) -> str:
    return html.escape(text.replace("\n", "↵").replace("\t", "⇥"))


def _context_html(ctx: Any, scale: float) -> str:
    spans = []
    for i, (piece, act) in enumerate(zip(ctx.pieces, ctx.acts, strict=True)):
        alpha = max(0.0, min(1.0, act / scale)) if scale > 0 else 0.0
        style = f"background: rgba(255, 140, 0, {alpha:.2f})" if alpha > 0.02 else ""
        cls = "ff-tok ff-fire" if i == ctx.firing else "ff-tok"
        spans.append(f"<span class='{cls}' style='{style}' title='{act:.3f}'>{_piece(piece)}</span>")
    return f"<div class='ff-ctx'><span class='ff-act'>{ctx.activation:.2f}</span>{''.join(spans)}</div>"


def _histogram_svg(edges: list[float], counts: list[int], width: int = 360, height: int = 70) -> str:
    used = [i for i, c in enumerate(counts) if c > 0]
    if not used:
        return ""
    lo, hi = used[0], used[-1] + 1
    top = max(counts[lo:hi])
    bar = width / (hi - lo)
    rects = "".join(
        f"<rect x='{(i - lo) * bar:.1f}' y='{height - 14 - (height - 18) * counts[i] / top:.1f}' "
        f"width='{max(bar - 1, 1):.1f}' height='{(height - 18) * counts[i] / top:.1f}'>"
        f"<title>{edges[i]:.3g}-{edges[i + 1]:.3g}: {counts[i]}</title></rect>"
        for i in range(lo, hi) if counts[i])
    labels = (f"<text x='0' y='{height - 2}'>{edges[lo]:.3g}</text>"
              f"<text x='{width}' y='{height - 2}' text-anchor='end'>{edges[hi]:.3g}</text>"
              f"<text x='{width / 2}' y='{height - 2}' text-anchor='middle'>activation (log scale)</text>")
    return f"<svg class='ff-hist' width='{width}' height='{height}' role='img'>{rects}{labels}</svg>"


def _link(ref: Any, score: float, labels: dict[str, str], linked: set[str] | None) -> dict[str, Any]:
    name = html.escape(str(ref))
    target = card_id(ref)
    shown = f"<a href='#{target}'>{name}</a>" if linked is None or target in linked else name
    return {"feature": Raw(shown), "cosine": score, "label": labels.get(str(ref), "")}


def card_html(card: Any, *, linked: set[str] | None = None, open: bool = False) -> str:
    """One card as an HTML fragment. ``linked``: the card ids present on the page (links to other
    features are made only to those; None links all)."""
    parts = [f"<details class='ff-card' id='{card_id(card.ref)}'{' open' if open else ''}><summary>"
             f"<span class='ff-ref'>{html.escape(str(card.ref))}</span>"
             f"<span class='ff-label'>{html.escape(card.label or '(no label)')}</span></summary>"]
    if card.lens:
        promoted = " ".join(html.escape(repr(t)) for t, _ in card.lens)
        suppressed = " ".join(html.escape(repr(t)) for t, _ in card.suppressed)
        parts.append(f"<div class='ff-lens'>logit lens: promotes {promoted}"
                     + (f" · suppresses {suppressed}" if suppressed else "") + "</div>")
    if card.density is not None:
        parts.append(f"<div class='ff-stats'>fires on {100 * card.density:.3g}% of {card.n_tokens:,} tokens read; "
                     f"mean activation when firing {card.mean_active or 0:.3g}</div>")
        parts.append(_histogram_svg(card.hist_edges, card.hist_counts))
    if card.contexts:
        scale = max(c.activation for c in card.contexts)
        parts.append("<div class='ff-contexts'>" + "".join(_context_html(c, scale) for c in card.contexts) + "</div>")
    elif card.density is not None:
        parts.append("<p class='ff-stats'>never fired on the tokens read</p>")
    preds = []
    for site, links in card.predecessors.items():
        for ref, score in links:
            preds.append({"site": site.upper(), **_link(ref, score, card.labels, linked)})
    if preds:
        scores = ", ".join(f"s({site.upper()}) = {value:.3f}" for site, value in card.scores.items())
        parts.append(f"<div class='ff-lens'>predecessors{': ' + scores if scores else ''}</div>"
                     + table_html(preds, ["site", "feature", "cosine", "label"]))
    if card.successors:
        parts.append("<div class='ff-lens'>successors</div>" + table_html(
            [_link(ref, score, card.labels, linked) for ref, score in card.successors], ["feature", "cosine", "label"]))
    parts.append("</details>")
    return "".join(parts)


def cards_html(cards: Iterable[Any]) -> str:
    """Several cards, linked to each other where both are present."""
    cards = list(cards)
    linked = {card_id(c.ref) for c in cards}
    return "".join(card_html(c, linked=linked) for c in cards)


class CardView:
    """A feature card to look at: inline in a notebook (``_repr_html_``), or saved as one HTML page."""

    def __init__(self, card: Any):
        self.card = card

    def __repr__(self) -> str:
        return f"CardView({self.card.ref}: {self.card.label})"

    def _repr_html_(self) -> str:
        return f"<style>{CARD_CSS}</style>" + card_html(self.card, open=True)

    def to_html(self) -> str:
        """A standalone page (no script, no network)."""
        title = html.escape(f"{self.card.ref}: {self.card.label or ''}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                f"<style>body {{ font-family: system-ui, sans-serif; max-width: 900px; margin: 2em auto; }}"
                f"{CARD_CSS}</style></head><body>{card_html(self.card, open=True)}</body></html>")

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_html` to ``path`` atomically."""
        atomic_write_text(path, self.to_html())
        return Path(path)

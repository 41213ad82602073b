"""Feature cards: everything that tells a reader what one feature is, as a result object.

A card gathers a feature's readable label, its top contexts token by token with the
feature's activation on each (for shading, as on Neuronpedia's pages), its activation
histogram and density, the tokens its decoder promotes and suppresses (logit lens),
its predecessors with s(R)/s(M)/s(A), and its successors. It is data only (saved to
JSON and read back); :func:`tl_featureflow.viz.plot.feature_card` draws it, inline in a
notebook or as a section of the HTML report.

>>> import torch
>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> model, (bank, _) = tiny_model(), planted_chain_bank()
>>> tokens = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
>>> card = build_card("2/res/1", model=model, bank=bank, tokens=tokens, progress=False)
>>> [str(ref) for ref, _ in card.predecessors["res"]][:1], card.successors[0][0].layer
(['1/res/7'], 3)
>>> FeatureCard.from_dict(card.to_dict()) == card
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_featureflow._files import atomic_write_json, check_header, header, read_json
from tl_featureflow.errors import CacheError, InvalidArgumentError
from tl_featureflow.flow.contexts import TopContexts, collect_top_contexts
from tl_featureflow.refs import FeatureRef
from tl_featureflow.saes.bank import SAEBank

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["FeatureCard", "CardContext", "build_card", "build_cards", "save_cards", "load_cards"]
_SCHEMA = 1

Link = tuple[FeatureRef, float]


@dataclass(frozen=True)
class CardContext:
    """One top context: token pieces, the feature's activation on each, the firing index."""

    pieces: tuple[str, ...]
    acts: tuple[float, ...]
    firing: int
    activation: float


@dataclass
class FeatureCard:
    """What one feature is: label, contexts, histogram, logit lens, predecessors and successors.

    ``predecessors`` maps a site to ``[(ref, cosine), ...]`` (res(L-1), mlp(L), att(L) for a
    res feature; res(L-1) for an mlp/att one); ``scores`` holds s(RES)/s(MLP)/s(ATT) (top-1
    cosines); ``successors`` is ``[(ref, cosine), ...]``; ``labels`` the short labels of the
    features named in both. ``hist_edges``/``hist_counts``: positive activations in log bins.
    """

    ref: FeatureRef
    label: str | None = None
    lens: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    contexts: list[CardContext] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)
    hist_counts: list[int] = field(default_factory=list)
    density: float | None = None
    mean_active: float | None = None
    n_tokens: int = 0
    predecessors: dict[str, list[Link]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    successors: list[Link] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        label = (self.label or "no label").splitlines()[0][:60]
        return (f"FeatureCard({self.ref}: {label!r}, {len(self.contexts)} contexts, "
                f"{sum(len(v) for v in self.predecessors.values())} predecessors, {len(self.successors)} successors)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": str(self.ref), "label": self.label, "lens": [list(x) for x in self.lens],
            "suppressed": [list(x) for x in self.suppressed],
            "contexts": [{"pieces": list(c.pieces), "acts": list(c.acts), "firing": c.firing,
                          "activation": c.activation} for c in self.contexts],
            "hist_edges": self.hist_edges, "hist_counts": self.hist_counts, "density": self.density,
            "mean_active": self.mean_active, "n_tokens": self.n_tokens,
            "predecessors": {site: [[str(r), s] for r, s in links] for site, links in self.predecessors.items()},
            "scores": self.scores, "successors": [[str(r), s] for r, s in self.successors], "labels": self.labels,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureCard:
        return cls(
            ref=FeatureRef.parse(data["ref"]), label=data.get("label"),
            lens=[(str(t), float(v)) for t, v in data.get("lens", [])],
            suppressed=[(str(t), float(v)) for t, v in data.get("suppressed", [])],
            contexts=[CardContext(tuple(c["pieces"]), tuple(float(a) for a in c["acts"]), int(c["firing"]),
                                  float(c["activation"])) for c in data.get("contexts", [])],
            hist_edges=[float(x) for x in data.get("hist_edges", [])],
            hist_counts=[int(x) for x in data.get("hist_counts", [])],
            density=data.get("density"), mean_active=data.get("mean_active"), n_tokens=int(data.get("n_tokens", 0)),
            predecessors={site: [(FeatureRef.parse(r), float(s)) for r, s in links]
                          for site, links in data.get("predecessors", {}).items()},
            scores={k: float(v) for k, v in data.get("scores", {}).items()},
            successors=[(FeatureRef.parse(r), float(s)) for r, s in data.get("successors", [])],
            labels=dict(data.get("labels", {})),
        )


def _neighbours(tracer: Any, ref: FeatureRef, k: int) -> tuple[dict[str, list[Link]], dict[str, float], list[Link]]:
    if ref.site == "res":
        preds = tracer.predecessors(ref, k=1)
        scores = {site: score for site in preds if (score := preds.s(site)) is not None}
        predecessors = {site: tracer.similar(ref, key, k) for site, key in tracer.predecessor_keys(ref.layer).items()}
    else:
        key = ("res", ref.layer - 1)
        predecessors = {"res": tracer.similar(ref, key, k)} if key in tracer.bank else {}
        scores = {}
    return predecessors, scores, tracer.successors(ref, k)


def build_card(
    ref: FeatureRef | str,
    *,
    model: HookedTransformer | None = None,
    bank: SAEBank | None = None,
    tokens: Any = None,
    contexts: TopContexts | None = None,
    tracer: Any = None,
    k: int = 3,
    n_contexts: int = 8,
    progress: bool = True,
) -> FeatureCard:
    """The card of one feature.

    Contexts come from ``contexts``, else from one pass over ``tokens``, else from the
    tracer's (``tracer.labels.contexts()``: held-out corpus text for a model with a tokenizer).
    The logit lens needs the model. ``k`` predecessors per site and successors are listed.
    """
    from tl_featureflow.flow.tracer import FlowTracer

    if tracer is None:
        if bank is None:
            raise InvalidArgumentError("build_card needs the bank (bank=...) or a FlowTracer (tracer=...)")
        if contexts is None and tokens is not None:
            if model is None:
                raise InvalidArgumentError("computing contexts from tokens needs the model (model=...)")
            contexts = collect_top_contexts(model, bank, tokens, progress=progress)
        tracer = FlowTracer(bank, model, contexts=contexts if contexts is not None else "auto")
    elif contexts is not None:
        tracer = FlowTracer(tracer.bank, tracer.model, contexts=contexts)
    return build_cards([ref], tracer, k=k, n_contexts=n_contexts)[0]


def build_cards(refs: list[FeatureRef | str], tracer: Any, *, k: int = 3, n_contexts: int = 8) -> list[FeatureCard]:
    """The cards of several features with one tracer (its contexts and model)."""
    contexts = tracer.labels.contexts()
    tokenizer = getattr(tracer.model, "tokenizer", None) if tracer.model is not None else None
    cards = []
    for raw in refs:
        ref = tracer.bank.check_ref(raw)
        predecessors, scores, successors = _neighbours(tracer, ref, k)
        named = [r for links in predecessors.values() for r, _ in links] + [r for r, _ in successors]
        card = FeatureCard(ref, label=tracer.labels.describe(ref), predecessors=predecessors, scores=scores,
                           successors=successors,
                           labels={str(r): label for r in named if (label := tracer.labels.describe(r))})
        if tracer.model is not None:
            card.lens = tracer.labels.logit_lens(ref, 8)
            card.suppressed = tracer.labels.logit_lens(ref, 8, suppressed=True)
        if contexts is not None and ref.key in contexts:
            card.contexts = [CardContext(tuple(h.pieces), tuple(h.acts), h.firing, h.activation)
                             for h in contexts.highlighted(ref, tokenizer)[:n_contexts]]
            edges, counts = contexts.histogram(ref)
            card.hist_edges, card.hist_counts = edges.tolist(), counts.tolist()
            card.density, card.mean_active = contexts.density(ref), contexts.mean_active(ref)
            card.n_tokens = contexts.n_tokens
        cards.append(card)
    return cards


def save_cards(cards: list[FeatureCard], path: str | Path) -> Path:
    """Write cards to one JSON file, atomically (what a run folder's ``cards.json`` holds)."""
    atomic_write_json(path, {**header("FeatureCards", _SCHEMA), "cards": [card.to_dict() for card in cards]})
    return Path(path)


def load_cards(path: str | Path) -> list[FeatureCard]:
    """Read what :func:`save_cards` wrote."""
    data = read_json(path, "feature cards")
    check_header(data, "FeatureCards", _SCHEMA, path)
    try:
        return [FeatureCard.from_dict(item) for item in data["cards"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{path} holds malformed feature cards: {exc!r}") from exc

"""Themes for steering experiments: a topic description, example texts, and seed features.

A theme's seed features are the res features that fire most on the theme's example
texts relative to neutral text (:data:`~tl_featureflow.steer.judge.NEUTRAL_TEXTS`):

    score(f) = mean activation on theme tokens - mean activation on neutral tokens

(BOS excluded), a contrast in the spirit of the paper's choice of features "by
their activation on theme texts". Given the bank's top contexts (held-out text the
features fire on most), each candidate shows them, so a reader sees why it was
chosen; given a judge and the theme's topic too, candidates whose contexts are on
topic come first (see :func:`theme_features`).

On the embedded model (needs its tokenizer)::

    feats = theme_features(model, bank, THEMES["religion"].texts, layer=14, k=3)
    feats[0]   # ThemeFeature(ref=FeatureRef(layer=14, site='res', index=249), score=..., ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from tl_featureflow.backend import backend_of
from tl_featureflow.checks import check_int, check_number, takes_settings
from tl_featureflow.errors import InvalidArgumentError, UnknownFeatureError
from tl_featureflow.refs import FeatureRef, Site
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.steer.judge import NEUTRAL_TEXTS

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Theme", "THEMES", "ThemeFeature", "ThemeSettings", "theme_features", "feature_activations"]


@dataclass(frozen=True)
class ThemeSettings:
    """The options of :func:`theme_features`, as one value (``theme_features(..., settings=s)``).

    Which layer to read stays an argument of the call. A keyword passed beside ``settings``
    overrides that field. Fields are checked here, each error naming its field.

    >>> ThemeSettings(k=3, min_share=0.25).k
    3
    >>> ThemeSettings(min_share=2.0)
    Traceback (most recent call last):
    ...
    tl_featureflow.errors.InvalidArgumentError: min_share=2.0 is out of range: expected a finite real number >= 0 <= 1
    """

    site: Site = "res"
    k: int = 5
    neutral: tuple[str, ...] = tuple(NEUTRAL_TEXTS)
    min_share: float = 0.5
    max_neutral_ratio: float = 0.2
    pool: int = 3
    n_contexts: int = 3

    def __post_init__(self) -> None:
        if self.site not in ("res", "mlp", "att"):
            raise InvalidArgumentError(f"site={self.site!r}: expected 'res', 'mlp' or 'att'")
        if isinstance(self.neutral, str) or not isinstance(self.neutral, Sequence) or not self.neutral:
            raise InvalidArgumentError(f"neutral={self.neutral!r}: expected a non-empty list of texts")
        object.__setattr__(self, "neutral", tuple(self.neutral))
        object.__setattr__(self, "min_share", check_number(self.min_share, "min_share", low=0, high=1))
        object.__setattr__(self, "max_neutral_ratio",
                           check_number(self.max_neutral_ratio, "max_neutral_ratio", low=0))
        for name, low in (("k", 1), ("pool", 1), ("n_contexts", 0)):
            check_int(getattr(self, name), name, low=low)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Theme:
    """A topic: its description (for the judge) and a few example texts (to find features)."""

    name: str
    description: str
    texts: tuple[str, ...]


THEMES: dict[str, Theme] = {
    "religion": Theme("religion", "religion, God, prayer, faith and the church", (
        "And God said unto Moses, I am the Lord thy God, and thou shalt worship me.",
        "They prayed together in the church and sang hymns to praise the Lord.",
        "Faith in God, prayer and the holy scripture guide the lives of believers.",
        "The priest blessed the congregation in the name of the Father and the Son.",
        "Blessed are the meek, for they shall inherit the earth, saith the Lord.",
        "She read the Bible every night and asked God to forgive her sins.",
    )),
    "programming": Theme("programming", "computer programming, Python code, functions and software", (
        "def parse(path):\n    with open(path) as f:\n        return json.load(f)",
        "The function returns a list of strings and raises ValueError on bad input.",
        "Import the module, create an instance of the class and call its method.",
        "for key, value in sorted(items.items()):\n    print(key, value)",
        "Use a dictionary to map each name to its index, then iterate over the keys.",
        "The interpreter raises a TypeError when the argument is not an integer.",
    )),
    "love": Theme("love", "love, romance, affection and the heart", (
        "My love for thee is deeper than the sea, sweet lady of my heart.",
        "She kissed him gently and whispered that she loved him with all her heart.",
        "O Romeo, Romeo, wherefore art thou Romeo? I love thee dearly.",
        "They fell in love that summer and wrote each other tender letters.",
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
        "His heart ached with longing and affection for his beloved.",
    )),
    "war": Theme("war", "war, battle, soldiers, swords and killing", (
        "The soldiers drew their swords and charged into the battle.",
        "The army marched to war, and many were slain by the sword.",
        "Cry havoc, and let slip the dogs of war!",
        "The king's forces besieged the city and the enemy fled in defeat.",
        "They fought bravely until the last soldier fell on the battlefield.",
        "Arm yourselves, for the enemy comes with spears and chariots to destroy us.",
    )),
}


@dataclass(frozen=True)
class ThemeFeature:
    """A candidate seed feature of a theme and the activations that chose it."""

    ref: FeatureRef
    score: float
    theme_mean: float
    neutral_mean: float
    max_activation: float
    contexts: tuple[str, ...] = ()
    on_theme: float | None = None


@torch.no_grad()
def feature_activations(model: object, bank: SAEBank, texts: Sequence[str], site: Site, layer: int,
                        *, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Per text, the activations ``[n_tokens, d_sae]`` of the SAE at ``(site, layer)`` (BOS dropped)."""
    if (site, layer) not in bank:
        raise UnknownFeatureError(f"the bank has no SAE at {(site, layer)}: it has {sorted(bank)}")
    from tl_featureflow.model import FlowTransformer

    flow = FlowTransformer.from_hooked(model)  # type: ignore[arg-type]
    rows = []
    for text in texts:
        tokens = backend_of(flow).tokenize(text).to(device or flow.cfg.device)
        _, feats = flow.run_with_features(tokens, sites=[site], layers=[layer], bank=bank, return_logits=False)
        rows.append(feats[site, layer][0, 1:].float().cpu())
    return rows


@takes_settings(ThemeSettings)
def theme_features(
    model: HookedTransformer,
    bank: SAEBank,
    texts: Sequence[str],
    *,
    settings: ThemeSettings | None = None,
    layer: int,
    site: Site = "res",
    k: int = 5,
    neutral: Sequence[str] = NEUTRAL_TEXTS,
    min_share: float = 0.5,
    max_neutral_ratio: float = 0.2,
    contexts: Any = None,
    judge: Any = None,
    topic: str | None = None,
    pool: int = 3,
    n_contexts: int = 3,
    device: torch.device | str | None = None,
) -> list[ThemeFeature]:
    """The ``k`` features of ``(site, layer)`` that best separate ``texts`` from ``neutral``.

    Features active on fewer than ``min_share`` of the theme's texts are skipped (a
    feature for one token of one example is not a theme feature), and so are features
    whose neutral mean exceeds ``max_neutral_ratio`` times their theme mean (dense
    features that fire on everything, a little more on the theme).

    With ``contexts`` (a :class:`~tl_featureflow.flow.contexts.TopContexts` of the bank)
    each candidate carries its ``n_contexts`` strongest contexts. With a ``judge`` and
    the theme's ``topic`` as well, the ``k * pool`` best candidates by contrast are
    ranked by ``on_theme``, the judge's mean similarity of their contexts with the topic:
    a feature that separates the example texts yet fires on off-topic text elsewhere
    ranks below one whose contexts are on theme.

    ``settings`` (a :class:`ThemeSettings`) gives ``site``, ``k``, ``neutral``, ``min_share``,
    ``max_neutral_ratio``, ``pool`` and ``n_contexts`` as one value; a keyword passed beside it
    overrides its field.
    """
    if not texts:
        raise InvalidArgumentError("theme_features needs at least one theme text")
    per_text_acts = feature_activations(model, bank, texts, site, layer, device=device)
    theme = torch.cat(per_text_acts)
    base = torch.cat(feature_activations(model, bank, neutral, site, layer, device=device))
    per_text = torch.stack([acts.amax(0) > 0 for acts in per_text_acts]).float().mean(0)
    score = theme.mean(0) - base.mean(0)
    score[(per_text < min_share) | (base.mean(0) > max_neutral_ratio * theme.mean(0))] = -float("inf")
    ranked = judge is not None and topic is not None and contexts is not None
    top = score.topk(min(k * pool if ranked else k, score.numel())).indices.tolist()
    found = [ThemeFeature(FeatureRef(layer, site, i), float(score[i]), float(theme[:, i].mean()),
                          float(base[:, i].mean()), float(theme[:, i].max())) for i in top if score[i] > 0]
    if contexts is not None:
        tokenizer = getattr(model, "tokenizer", None)
        found = [replace(f, contexts=tuple(e.text for e in contexts.examples(f.ref, tokenizer, window=6)[:n_contexts]))
                 if f.ref.key in contexts else f for f in found]
    if ranked:
        tokenizer = getattr(model, "tokenizer", None)
        found = [replace(f, on_theme=_on_theme(judge, _plain_contexts(contexts, f.ref, tokenizer, n_contexts), topic))
                 for f in found]
        found.sort(key=lambda f: -(f.on_theme if f.on_theme is not None else -1.0))
    return found[:k]


def _plain_contexts(contexts: Any, ref: FeatureRef, tokenizer: Any, n: int) -> list[str]:
    """A feature's ``n`` strongest contexts as plain text (no marks: real brackets in code stay)."""
    if ref.key not in contexts:
        return []
    return ["".join(h.pieces) for h in contexts.highlighted(ref, tokenizer, left=6, right=6)[:n]]


def _on_theme(judge: Any, contexts: Sequence[str], topic: str) -> float | None:
    """The judge's mean similarity of a feature's contexts with the topic."""
    if not contexts:
        return None
    return float(judge.similarity(list(contexts), topic).mean())

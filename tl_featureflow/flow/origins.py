"""Predecessor scores of a layer and what they say about each feature (method section 3).

For every res feature f of layer L, ``s(P) = max_j f . W_dec_P[j]`` for P in res(L-1),
mlp(L), att(L). A feature is

| label       | s(res) | max(s(mlp), s(att)) |
|-------------|--------|---------------------|
| translated  | high   | low                 |
| processed   | high   | high                |
| newborn     | low    | high                |
| unexplained | low    | low                 |

"High" means at or above the site's threshold. Sites the bank lacks count as low.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.errors import BankError, InvalidArgumentError
from tl_featureflow.refs import LABELS, Site

__all__ = ["LABELS", "LayerScores", "Classification", "classify_scores"]



@dataclass
class LayerScores:
    """Top-k predecessor scores and indices of every res feature of one layer.

    ``scores[site]`` and ``indices[site]`` are ``[d_sae, k]``, best first, for the sites
    the bank has (``res`` means res(L-1), absent at the bank's first res layer).
    """

    layer: int
    scores: dict[Site, Float[Tensor, "d_sae k"]]
    indices: dict[Site, Int[Tensor, "d_sae k"]]

    def __repr__(self) -> str:
        shape = next(iter(self.scores.values())).shape if self.scores else (0, 0)
        return f"LayerScores(layer {self.layer}, {shape[0]} features, k={shape[1]}, sites {sorted(self.scores)})"

    def s(self, site: Site) -> Float[Tensor, " d_sae"] | None:
        """The top-1 score s(P) of every feature, or None when the site is absent."""
        return self.scores[site][:, 0] if site in self.scores else None

    def argmax(self, site: Site) -> Int[Tensor, " d_sae"] | None:
        """The index of the best predecessor in ``site``, or None when the site is absent."""
        return self.indices[site][:, 0] if site in self.indices else None

    @property
    def n_features(self) -> int:
        return next(iter(self.scores.values())).shape[0] if self.scores else 0


@dataclass
class Classification:
    """Labels of every res feature of a layer, with the thresholds that produced them.

    ``codes[i]`` indexes :data:`LABELS`; ``thresholds`` maps each site to the score
    that counts as "high"; ``method`` says how the thresholds were chosen.
    """

    layer: int
    codes: Int[Tensor, " d_sae"]
    thresholds: dict[Site, float]
    method: str
    scores: LayerScores = field(repr=False)

    def label(self, index: int) -> str:
        return LABELS[int(self.codes[index])]

    @property
    def labels(self) -> list[str]:
        return [LABELS[int(c)] for c in self.codes]

    def counts(self) -> dict[str, int]:
        """How many features carry each label (every label present, zeros included)."""
        counts = torch.bincount(self.codes, minlength=len(LABELS))
        return {name: int(n) for name, n in zip(LABELS, counts, strict=False)}

    def features(self, label: str) -> Int[Tensor, " n"]:
        """Indices of the features with ``label``."""
        if label not in LABELS:
            raise InvalidArgumentError(f"unknown label {label!r}: expected one of {LABELS}")
        return (self.codes == LABELS.index(label)).nonzero().squeeze(1)


def classify_scores(scores: LayerScores, thresholds: dict[Site, float]) -> Int[Tensor, " d_sae"]:
    """Label codes (indices into :data:`LABELS`) from top-1 scores and per-site thresholds."""
    n = scores.n_features
    if n == 0:
        raise BankError(f"layer {scores.layer} has no predecessor scores: the bank has no predecessor sites")

    def high(site: Site) -> Tensor:
        s = scores.s(site)
        if s is None:
            return torch.zeros(n, dtype=torch.bool)
        if site not in thresholds:
            raise InvalidArgumentError(f"no threshold for site {site!r}: got thresholds for {sorted(thresholds)}")
        return s.cpu() >= thresholds[site]

    res = high("res")
    module = high("mlp") | high("att")
    codes = torch.full((n,), LABELS.index("unexplained"), dtype=torch.int64)
    codes[res & ~module] = LABELS.index("translated")
    codes[res & module] = LABELS.index("processed")
    codes[~res & module] = LABELS.index("newborn")
    return codes

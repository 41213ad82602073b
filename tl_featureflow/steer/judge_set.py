"""A small labelled set kept in the repository, and how well the offline judge separates it (AUC).

The offline judge is a proxy for the paper's LLM judge, so its two scores are checked on
text whose answer is known: **concept** (behavioural) on sentences written on each theme
against sentences on the other themes and neutral ones, **fluency** (coherence) on fluent
sentences against broken versions of the same sentences (words shuffled, a word repeated,
the sentence cut into a stutter). :func:`judge_auc` reports the AUC of each, with n.

>>> from tl_featureflow.steer.judge_set import auc
>>> auc([0.9, 0.8], [0.1, 0.85])            # 3 of 4 pairs ordered right
0.75
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from tl_featureflow.backend import backend_of
from tl_featureflow.errors import InvalidArgumentError

__all__ = ["ON_TOPIC", "broken_versions", "auc", "judge_auc"]

#: Sentences written on each theme (not the texts seed features are chosen with).
ON_TOPIC: dict[str, tuple[str, ...]] = {
    "religion": (
        "The monks rose before dawn to pray in the quiet chapel.",
        "Every Sunday the family went to church and listened to the sermon.",
        "He lit a candle at the altar and asked God for strength.",
        "The prophet spoke of salvation, sin and the mercy of the Lord.",
        "Pilgrims travelled for weeks to reach the holy shrine.",
        "The choir sang a hymn of praise as the bishop entered the cathedral.",
    ),
    "war": (
        "The general ordered his troops to attack at first light.",
        "Cannons thundered as the two armies clashed on the plain.",
        "Many soldiers died in the trenches during the long siege.",
        "The knights raised their swords and rode into battle.",
        "The city fell after the enemy broke through its walls.",
        "Wounded men were carried from the battlefield after the fighting.",
    ),
    "love": (
        "He wrote her a love letter and sealed it with a kiss.",
        "They held hands and gazed at each other under the moonlight.",
        "Her heart raced whenever her sweetheart smiled at her.",
        "The couple promised to love each other for the rest of their lives.",
        "She missed him terribly and longed to be in his arms again.",
        "Their romance blossomed over long walks and tender words.",
    ),
    "programming": (
        "The function parses the JSON file and returns a dictionary.",
        "Fix the bug by checking whether the list is empty before indexing it.",
        "We wrote unit tests for every class in the Python module.",
        "The compiler reported a syntax error on line twelve of the script.",
        "Store the results in an array and sort them with a lambda key.",
        "The loop iterates over each key and prints its value to the console.",
    ),
}


def broken_versions(sentence: str, seed: int = 0) -> list[str]:
    """Three broken versions of a sentence: its words shuffled, one word repeated, a stutter."""
    words = sentence.rstrip(".").split()
    rng = random.Random(f"{seed}:{sentence}")
    shuffled = words[:]
    while shuffled == words and len(words) > 1:
        rng.shuffle(shuffled)
    repeated = " ".join([words[len(words) // 2]] * len(words))
    stutter = " ".join(w for w in words[:3] for _ in range(3))
    return [" ".join(shuffled), repeated, stutter]


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    if not positives or not negatives:
        raise InvalidArgumentError("auc needs at least one positive and one negative score")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def judge_auc(judge: Any, *, themes: dict[str, str] | None = None) -> dict[str, Any]:
    """AUC of the judge's concept score per theme and of its fluency score, with n.

    ``judge``: an :class:`~tl_featureflow.steer.judge.OfflineJudge` (its ``similarity`` for
    concept; its ``model`` for perplexity, calibrated on the neutral texts, for fluency).
    ``themes``: theme -> topic description (default: the built-in THEMES' descriptions).
    """
    import torch

    from tl_featureflow.steer.judge import NEUTRAL_TEXTS, perplexity
    from tl_featureflow.steer.themes import THEMES

    themes = themes or {name: THEMES[name].description for name in ON_TOPIC}
    concept = {}
    for name, topic in themes.items():
        on = list(ON_TOPIC[name])
        off = [s for other, texts in ON_TOPIC.items() if other != name for s in texts] + list(NEUTRAL_TEXTS)
        scores = judge.similarity(on + off, topic).tolist()
        concept[name] = {"auc": auc(scores[: len(on)], scores[len(on):]), "n_on": len(on), "n_off": len(off)}
    out: dict[str, Any] = {"concept": concept}
    if getattr(judge, "model", None) is not None:
        fluent = [s for texts in ON_TOPIC.values() for s in texts]
        broken = [b for s in fluent for b in broken_versions(s)]
        tokenizer = backend_of(judge.model).tokenizer

        bos = torch.tensor([[tokenizer.bos_token_id]])

        def measure(texts: list[str]) -> tuple[list[float], list[list[int]]]:
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            return [float(perplexity(judge.model, bos, torch.tensor([row]))[0]) for row in ids], ids

        ref_ppl, ref_ids = measure(list(NEUTRAL_TEXTS))
        judge.calibrate("fluency", off_topic=list(NEUTRAL_TEXTS), reference_ppl=ref_ppl, reference_tokens=ref_ids)
        good, bad = judge.coherence(*measure(fluent)).tolist(), judge.coherence(*measure(broken)).tolist()
        out["fluency"] = {"auc": auc(good, bad), "n_fluent": len(good), "n_broken": len(bad)}
    return out

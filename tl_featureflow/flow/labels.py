"""Feature labels: what a feature fires on (its top contexts) and what it promotes (the logit lens).

:class:`FeatureLabels` is the labelling half of what used to be ``FlowTracer``: the tracer matches
and traces, and asks its ``labels`` for the text of a graph's nodes. Nothing here loads, runs or
writes on attribute access: ``contexts="auto"`` is resolved by :meth:`FeatureLabels.contexts`, an
explicit call (made by the first label that needs it), which computes the bank's top contexts once
(:func:`~tl_featureflow.flow.contexts.feature_contexts`, cached on disk with the bank).

>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> bank, _ = planted_chain_bank()
>>> labels = FeatureLabels(bank, tiny_model(), contexts=None)      # no contexts: logit-lens labels only
>>> len(labels.logit_lens("1/res/4", k=3))
3
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tl_featureflow.backend import backend_of
from tl_featureflow.errors import InvalidArgumentError
from tl_featureflow.refs import FeatureRef
from tl_featureflow.saes.bank import SAEBank

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["FeatureLabels"]


def _top_z(logits: torch.Tensor) -> torch.Tensor:
    """``(max - mean) / std`` of each row of ``[n, d_vocab]`` logits."""
    logits = logits.float()
    return (logits.max(dim=1).values - logits.mean(dim=1)) / logits.std(dim=1).clamp_min(1e-12)


class FeatureLabels:
    """Labels of a bank's features, from their top contexts and (with a model) the logit lens.

    Args:
        bank: the SAEs whose decoder rows the logit lens reads.
        model: optional; gives the unembedding (and the tokenizer that names tokens).
        contexts: a :class:`~tl_featureflow.flow.contexts.TopContexts`, ``"auto"`` (computed by
            :meth:`contexts` when a label first needs them, if the model has a tokenizer) or None.
    """

    def __init__(self, bank: SAEBank, model: HookedTransformer | None = None, contexts: Any | None = "auto"):
        self.bank = bank
        self.model = model
        self._null: dict[tuple[int, float, int], float] = {}
        self.set_contexts(contexts)

    def contexts(self) -> Any | None:
        """The features' top contexts; with ``"auto"`` computed (and cached with the bank) on this first call."""
        if isinstance(self._contexts, str):
            tokenizer = getattr(self.model, "tokenizer", None) if self.model is not None else None
            if tokenizer is None:
                self._contexts = None
            else:
                from tl_featureflow.flow.contexts import feature_contexts

                self._contexts = feature_contexts(self.model, self.bank)
        return self._contexts

    def given(self) -> bool:
        """Whether top contexts were given (or already computed), not ``"auto"`` or None."""
        return self._contexts is not None and not isinstance(self._contexts, str)

    def set_contexts(self, contexts: Any | None) -> None:
        """Use ``contexts`` (a TopContexts, ``"auto"`` or None) from now on."""
        if isinstance(contexts, str) and contexts != "auto":
            raise InvalidArgumentError(f"contexts={contexts!r}: expected a TopContexts, 'auto' or None")
        self._contexts = contexts

    @torch.no_grad()
    def logit_lens(self, ref: FeatureRef | str, k: int = 8, *, suppressed: bool = False) -> list[tuple[str, float]]:
        """The ``k`` tokens a feature's decoder direction promotes most: ``W_dec[i] @ W_U``
        (with ``suppressed=True``: the ``k`` it suppresses most, most negative first).

        The final norm's weight (when the model has one) scales the direction first, as
        it would on its way to the unembedding.
        """
        if self.model is None:
            raise InvalidArgumentError("logit_lens needs a model: FlowTracer(bank, model)")
        ref = self.bank.check_ref(ref)
        values, ids = self._lens_logits(ref).topk(k, largest=not suppressed)
        tokenizer = getattr(self.model, "tokenizer", None)
        names = [tokenizer.decode([i]) if tokenizer is not None else str(i) for i in ids.tolist()]
        return list(zip(names, values.tolist(), strict=False))

    @torch.no_grad()
    def lens_z(self, ref: FeatureRef | str) -> float:
        """How far the logit lens's top token stands out: ``(max - mean) / std`` of ``W_dec[i] @ W_U``."""
        return float(_top_z(self._lens_logits(self.bank.check_ref(ref))[None])[0])

    @torch.no_grad()
    def lens_null(self, n: int = 256, quantile: float = 0.99, seed: int = 0) -> float:
        """The ``quantile`` of :meth:`lens_z` over ``n`` random directions (isotropic in ``d_model``,
        through the same final norm and unembedding): the top z a direction with nothing to say reaches.

        With a vocabulary of ~49k the top of ~Gaussian logits sits near 4.3 standard deviations
        whatever the direction; a feature's lens carries signal when its top token stands out
        further than almost every random direction's (:meth:`lens_is_signal`). Cached per call
        arguments.
        """
        key = (n, quantile, seed)
        if key not in self._null:
            if self.model is None:
                raise InvalidArgumentError("the logit lens needs a model: FlowTracer(bank, model)")
            backend = backend_of(self.model)
            g = torch.Generator().manual_seed(seed)
            directions = torch.randn(n, backend.d_model, generator=g)
            self._null[key] = float(torch.quantile(_top_z(backend.unembed(directions)).float(), quantile))
        return self._null[key]

    def lens_is_signal(self, ref: FeatureRef | str) -> bool:
        """Whether a feature's logit lens says more than a random direction's (its :meth:`lens_z`
        above :meth:`lens_null`): the report shows the lens only where it does."""
        return self.lens_z(ref) > self.lens_null()

    def _lens_logits(self, ref: FeatureRef) -> torch.Tensor:
        return backend_of(self.model).unembed(self.bank.decoder(*ref.key, dtype=torch.float32)[ref.index])

    def lens_label(self, ref: FeatureRef | str, k: int = 5) -> str:
        """The top ``k`` logit-lens tokens as one line (the second line of a feature's label)."""
        return " ".join(repr(token) for token, _ in self.logit_lens(ref, k))

    def describe(self, ref: FeatureRef | str, k: int = 5) -> str | None:
        """A feature's primary label: what it fires on (:meth:`TopContexts.label`) when contexts are
        known, else its top ``k`` logit-lens tokens; None with neither."""
        ref = FeatureRef.parse(ref)
        contexts = self.contexts()
        if contexts is not None and ref.key in contexts:
            return contexts.label(ref, getattr(self.model, "tokenizer", None))
        return self.lens_label(ref, k) if self.model is not None else None

    def node_labels(self, ref: FeatureRef) -> tuple[str | None, str | None]:
        """``(label, lens)`` of a flow-graph node: the primary label, and the logit-lens line where
        it carries signal (:meth:`lens_is_signal`; else None, so reports leave the noise out)."""
        lens = self.lens_label(ref) if self.model is not None and self.lens_is_signal(ref) else None
        return self.describe(ref) or lens, lens

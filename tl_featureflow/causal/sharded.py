"""The deactivation experiment over the ranks of a distributed run (:mod:`tl_featureflow.distributed`).

Every rank validates a contiguous block of the texts (``validate(..., texts=block)``: each
text draws from its own generator, and matches fitted on the texts read all of them), and
rank 0 merges the reports (:meth:`ValidationReport.merge`): the report of one process, row
for row.

>>> import torch
>>> import tl_featureflow as ff
>>> from tl_featureflow.distributed import single
>>> from tl_featureflow.synthetic import random_bank, tiny_model
>>> model, bank = tiny_model(), random_bank(range(3), d_sae=32)
>>> tokens = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
>>> tracer = ff.FlowTracer(bank, model, contexts=None)
>>> kwargs = dict(layers=[1], methods=["top1"], progress=False)
>>> validate(tracer, model, tokens, single(), **kwargs).rows == ff.validate(tracer, model, tokens, **kwargs).rows
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jaxtyping import Int
from torch import Tensor

from tl_featureflow.causal import experiment
from tl_featureflow.causal.results import ValidationReport
from tl_featureflow.distributed import Ranks, gather_to_root, shard_range
from tl_featureflow.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["validate"]


def validate(tracer: Any, model: HookedTransformer, tokens: Int[Tensor, "n_texts pos"], ranks: Ranks, *,
             layers: Sequence[int], progress: bool = True, **kwargs: Any) -> ValidationReport | None:
    """:func:`~tl_featureflow.causal.experiment.validate` of ``tokens`` over the ranks (same arguments); rank 0
    returns the merged report, the others None. A rank that fails ends every rank with a
    :class:`~tl_featureflow.errors.DistributedError` naming it and the text it failed on."""
    if "texts" in kwargs:
        raise InvalidArgumentError("a distributed validation shares all the texts out itself: texts= is not taken")
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise InvalidArgumentError(f"tokens: expected a [n_texts, pos] tensor of token ids, got "
                                   f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    shard = shard_range(int(tokens.shape[0]), ranks)
    reports = gather_to_root(ranks, lambda: experiment.validate(tracer, model, tokens, layers=layers, texts=shard,
                                                                 progress=progress and ranks.is_root, **kwargs),
                             "validating its texts")          # the failed text is in the rank's message
    return None if reports is None else ValidationReport.merge(reports)

"""ActivationStream: deterministic batches of model activations for SAE training; token batches of a stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from tl_featureflow.backend import backend_of
from tl_featureflow.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["ActivationStream", "token_batches"]


def token_batches(tokens: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Rows of a ``[rows, seq]`` tensor ``batch_size`` at a time, or the batches of an iterable as they come."""
    if isinstance(tokens, Tensor):
        for start in range(0, tokens.shape[0], batch_size):
            yield tokens[start : start + batch_size]
    else:
        yield from tokens


class ActivationStream:
    """Deterministic batches of activations at several hooks, one forward pass per chunk.

    Batch ``i`` is a pure function of the token rows, the seed and ``i``: rows are
    visited in a seeded order per epoch, ``chunk_rows`` rows at a time; the chunk's
    tokens (position 0 skipped: BOS and attention-sink activations are outliers) are
    shuffled with a seed of their own and cut into batches of ``batch_tokens``. ``last_block``: the
    deepest block whose hooks are read (the forward stops after it; None runs the whole model).
    """

    def __init__(self, model: HookedTransformer, tokens: Int[Tensor, "n_rows ctx"], hooks: Sequence[str], *,
                 batch_tokens: int, chunk_rows: int, seed: int = 0, last_block: int | None = None):
        if tokens.shape[0] < chunk_rows:
            raise InvalidArgumentError(
                f"the corpus has {tokens.shape[0]} rows but one chunk needs {chunk_rows}: use more text or a smaller chunk"
            )
        self.model, self.tokens, self.hooks = model, tokens, list(hooks)
        self.batch_tokens, self.chunk_rows, self.seed, self.last_block = batch_tokens, chunk_rows, seed, last_block
        chunk_tokens = chunk_rows * (tokens.shape[1] - 1)
        self.batches_per_chunk = chunk_tokens // batch_tokens
        if self.batches_per_chunk < 1:
            raise InvalidArgumentError(f"a chunk holds {chunk_tokens} tokens, fewer than one batch of {batch_tokens}")
        self.chunks_per_epoch = tokens.shape[0] // chunk_rows
        self._cached: tuple[int, dict[str, Tensor]] | None = None

    def _chunk(self, index: int) -> dict[str, Tensor]:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        epoch, within = divmod(index, self.chunks_per_epoch)
        order = torch.randperm(self.tokens.shape[0], generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        rows = self.tokens[order[within * self.chunk_rows:(within + 1) * self.chunk_rows]]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            stop = None if self.last_block is None else self.last_block + 1
            cache = backend_of(self.model).run_with_cache(rows.to(device), self.hooks, stop_at_layer=stop)
        shuffle = torch.randperm(rows.shape[0] * (rows.shape[1] - 1),
                                 generator=torch.Generator().manual_seed(self.seed * 7_919 + index))
        acts = {h: cache[h][:, 1:].flatten(2).flatten(0, 1)[shuffle.to(device)] for h in self.hooks}   # hook_z: heads flat
        self._cached = (index, acts)
        return acts

    def batch(self, index: int) -> dict[str, Tensor]:
        chunk, offset = divmod(index, self.batches_per_chunk)
        acts = self._chunk(chunk)
        sl = slice(offset * self.batch_tokens, (offset + 1) * self.batch_tokens)
        return {h: a[sl] for h, a in acts.items()}

    def iterate(self, start: int = 0) -> Iterator[dict[str, Tensor]]:
        index = start
        while True:
            yield self.batch(index)
            index += 1

"""The flow map and top contexts over the ranks of a distributed run (:mod:`tl_featureflow.distributed`).

:func:`flow_map` shares the layer pairs (every res(L) with its res(L-1), mlp(L) and att(L)) out
round robin; rank 0 gathers each round and writes the layers as they complete, the files
``FlowTracer.flow_map`` writes (a killed run resumes from them, in one process or many).
:func:`top_contexts` gives every rank a contiguous block of the rows, cut at multiples of the
batch size, and merges the blocks' tables exactly (:meth:`TopContexts.merge`). Both equal the
single-process results: bit for bit where every rank computes on the same kind of device with
the same thread count (what the tests check), else to float32 rounding of the matmuls.

>>> from tl_featureflow.distributed import single
>>> from tl_featureflow.flow.tracer import FlowTracer
>>> from tl_featureflow.synthetic import planted_chain_bank
>>> fmap = flow_map(FlowTracer(planted_chain_bank()[0]), None, single(), progress=False)
>>> fmap.layers, fmap.classify(2).counts()["processed"]
([1, 2, 3], 2)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from tl_featureflow.checks import check_int, check_tokens
from tl_featureflow.distributed import Ranks, all_ok, broadcast_from_root, gather_to_root, note, shard_range
from tl_featureflow.errors import InvalidArgumentError
from tl_featureflow.flow.contexts import TopContexts, collect_top_contexts, contexts_meta
from tl_featureflow.flow.flowmap import FlowMap, FlowMapWriter
from tl_featureflow.flow.origins import LayerScores
from tl_featureflow.flow.tracer import FlowTracer, Thresholds
from tl_featureflow.refs import Site
from tl_featureflow.saes.bank import SAEBank

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["flow_map", "top_contexts"]

Pair = tuple[int, Site]                          # (layer of the res features, predecessor site)
PairResult = tuple[Tensor, Tensor, float]         # scores [d_sae, k], indices [d_sae, k], the site's threshold


def _pair(tracer: FlowTracer, pair: Pair | None, k: int, thresholds: Thresholds, quantile: float,
          method: str | None = None) -> PairResult | None:
    """One layer pair's top-k matches and threshold, on the CPU (None: no pair for this rank this round)."""
    if pair is None:
        return None
    layer, site = pair
    try:
        scores, indices = tracer.pair_scores(layer, site, k, method=method)
        threshold = tracer.thresholds(layer, thresholds, quantile=quantile, sites=[site])[site]
    except Exception as exc:
        note(exc, f"while matching {site}({layer - 1 if site == 'res' else layer}) -> res({layer})")
        raise
    finally:
        tracer.forget_matches()
    return scores.cpu(), indices.cpu(), threshold


def flow_map(
    tracer: FlowTracer,
    path: str | Path | None,
    ranks: Ranks,
    *,
    layers: Iterable[int] | None = None,
    k: int = 1,
    thresholds: Thresholds = "chance",
    quantile: float = 0.99,
    progress: bool = True,
    method: str | None = None,
) -> FlowMap | None:
    """``tracer.flow_map(path, ...)`` computed by every rank of ``ranks``, each its share of the layer pairs.

    Every rank needs the whole bank (its pairs' SAEs at least). Rank 0 opens ``path`` (resuming
    what is there, refusing a map of another bank or settings), writes every layer once all its
    pairs are in, and returns the :class:`FlowMap`; the other ranks return None. A rank that
    fails ends every rank with a :class:`~tl_featureflow.errors.DistributedError` naming it
    and the pair; the layers written by then stay, and a rerun resumes after them.
    """
    from tqdm.auto import tqdm

    layers = None if layers is None else list(layers)
    planned, meta = all_ok(ranks, lambda: tracer.map_plan(layers, k=k, thresholds=thresholds, quantile=quantile,
                                                             method=method),
                           "planning the flow map")
    opened: dict[str, FlowMapWriter] = {}

    def open_folder() -> list[int]:
        if path is None:
            return []
        opened["writer"] = FlowMapWriter(path, planned, meta)     # resumes what is there
        return sorted(opened["writer"].done)

    resumed = broadcast_from_root(ranks, open_folder, f"opening the flow map at {path}")
    writer = opened.get("writer")
    done: dict[int, LayerScores] = {} if writer is None else dict(writer.done)
    thr: dict[int, dict[Site, float]] = {} if writer is None else dict(writer.thresholds)
    pairs = [(layer, site) for layer in planned if layer not in resumed for site in tracer.predecessor_keys(layer)]
    found: dict[int, dict[Site, PairResult]] = {}
    world = ranks.world_size
    bar = tqdm(total=len(pairs), desc="flow map", unit="pair", disable=not (progress and ranks.is_root))
    for start in range(0, len(pairs), world):
        round_pairs = pairs[start:start + world]
        mine = round_pairs[ranks.rank] if ranks.rank < len(round_pairs) else None
        results = gather_to_root(ranks, lambda mine=mine: _pair(tracer, mine, k, thresholds, quantile, method),
                                 f"matching layer pairs {round_pairs}")
        if results is not None:
            for (layer, site), result in zip(round_pairs, results, strict=False):   # one result per pair
                if result is not None:
                    found.setdefault(layer, {})[site] = result

        def write_complete() -> None:                 # rank 0: every layer whose pairs are all in
            for layer in [x for x in list(found) if len(found[x]) == len(tracer.predecessor_keys(x))]:
                sites = list(tracer.predecessor_keys(layer))      # the order FlowTracer.scores gives them
                got = found.pop(layer)
                done[layer] = LayerScores(layer, {s: got[s][0] for s in sites}, {s: got[s][1] for s in sites})
                thr[layer] = {s: got[s][2] for s in sites}
                if writer is not None:
                    writer.add(layer, done[layer], thr[layer])

        all_ok(ranks, write_complete if ranks.is_root else (lambda: None), f"writing the flow map at {path}")
        bar.update(len(round_pairs))
    bar.close()
    if not ranks.is_root:
        return None
    return FlowMap({layer: done[layer] for layer in planned}, {layer: thr[layer] for layer in planned}, meta)


def top_contexts(
    model: HookedTransformer,
    bank: SAEBank,
    tokens: Int[Tensor, "n_doc seq"],
    ranks: Ranks,
    *,
    n: int = 10,
    batch_size: int = 8,
    left: int = 12,
    right: int = 4,
    sites: list[Site] | None = None,
    layers: list[int] | None = None,
    skip_first: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TopContexts | None:
    """:func:`~tl_featureflow.flow.contexts.collect_top_contexts` of ``tokens`` over the ranks: each reads a
    contiguous block of rows (whole batches), rank 0 merges the tables and returns the one a single
    pass gives (the others return None)."""
    if not isinstance(tokens, Tensor):
        raise InvalidArgumentError(f"distributed top contexts need a [n_doc, seq] tensor of token ids (a stream "
                                   f"cannot be cut into shards), got {type(tokens).__name__}")
    check_int(n, "n", low=1), check_int(batch_size, "batch_size", low=1)
    check_int(left, "left"), check_int(right, "right")
    check_tokens(tokens, model.cfg.d_vocab, n_ctx=model.cfg.n_ctx)
    shard = shard_range(int(tokens.shape[0]), ranks, align=batch_size)

    def collect() -> TopContexts | None:
        if not len(shard):
            return None
        try:
            return collect_top_contexts(model, bank, tokens[shard.start:shard.stop], n=n, batch_size=batch_size,
                                        left=left, right=right, sites=sites, layers=layers, skip_first=skip_first,
                                        device=device, progress=progress and ranks.is_root, first_doc=shard.start)
        except Exception as exc:
            note(exc, f"while collecting the top contexts of rows {shard.start}-{shard.stop - 1}")
            raise

    parts = gather_to_root(ranks, collect, "collecting the top contexts of its rows")
    if parts is None:
        return None
    meta = contexts_meta(bank.select(sites=sites, layers=layers), tokens, n=n, left=left, right=right,
                         skip_first=skip_first)
    return TopContexts.merge([p for p in parts if p is not None], meta=meta)

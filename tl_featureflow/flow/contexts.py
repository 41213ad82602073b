"""What every feature fires on: top activating contexts and activation histograms, in one streaming pass.

Like Neuronpedia's feature pages: for each feature, the ``n`` token positions (over
the given text) where it fires hardest, each with the tokens around it and the
feature's activation on every one of them (for shading), plus a histogram of its
positive activations (log-spaced bins) and how often it fires. Memory stays bounded
whatever the stream's length: per SAE a running top-``n`` (``[d_sae, n]`` plus the
windows, ``[d_sae, n, left + 1 + right]``) and a histogram (``[d_sae, n_bins]``) are
merged batch by batch; activations are never all kept.

These contexts are the features' primary labels (:meth:`TopContexts.label`): the
tokens a feature fires on most, with its best context, the firing token in
[brackets]. :func:`feature_contexts` computes them once per bank and model from
held-out corpus text and caches them beside the bank in the cache.

>>> import torch
>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> model, (bank, _) = tiny_model(), planted_chain_bank()
>>> tokens = torch.randint(0, 100, (6, 16), generator=torch.Generator().manual_seed(0))
>>> contexts = collect_top_contexts(model, bank, tokens, n=3, sites=["res"], layers=[2], progress=False)
>>> best = contexts.examples("2/res/1", window=2)[0]     # with a tokenizer: text instead of token ids
>>> best.activation >= contexts.examples("2/res/1")[-1].activation
True
>>> contexts.label("2/res/1").count("[") == 1           # its firing tokens, then its best context
True
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow._files import (
    atomic_directory,
    cache_root,
    check_header,
    entry_lock,
    header,
    read_manifest,
    recover_directory,
    tensor_digest,
    write_manifest,
)
from tl_featureflow.backend import backend_of
from tl_featureflow.checks import check_int, check_tokens
from tl_featureflow.errors import CacheError, InvalidArgumentError, UnknownFeatureError
from tl_featureflow.refs import FeatureRef, Key, Site
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.stream import token_batches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["TopContexts", "Example", "collect_top_contexts", "feature_contexts", "contexts_meta", "HIST_EDGES",
           "DEFAULT_CONTEXT_ROWS"]

_MANIFEST = "contexts.json"
_SCHEMA = 2
#: Histogram bin edges of positive activations: log-spaced, 20 bins per decade from 1e-3 to 1e3
#: (activations outside are counted in the first / last bin).
_LOG_LO, _LOG_STEP, _N_BINS = -3.0, 0.05, 120
HIST_EDGES: Float[Tensor, " n_edges"] = torch.logspace(_LOG_LO, _LOG_LO + _LOG_STEP * _N_BINS, _N_BINS + 1,
                                                       dtype=torch.float64)
#: Held-out corpus rows (128 tokens each) :func:`feature_contexts` reads by default.
DEFAULT_CONTEXT_ROWS = 192


class Example(NamedTuple):
    activation: float
    text: str
    doc: int
    pos: int


class Highlighted(NamedTuple):
    """One context, token by token: the pieces, the feature's activation on each, the firing index."""

    pieces: list[str]
    acts: list[float]
    firing: int
    activation: float


@dataclass
class TopContexts:
    """Per SAE (keyed ``(site, layer)``): the top-``n`` contexts of every feature, strongest first.

    ``values``/``doc``/``pos`` are ``[d_sae, n]`` (an empty slot, a feature that fired
    fewer than ``n`` times, has value 0 and doc/pos -1; ``doc`` counts rows of the
    stream); ``window_tokens``/``window_acts`` are ``[d_sae, n, left + 1 + right]``, the
    tokens around each position (-1 past a row's ends) and the feature's activation on
    each; ``hist`` is ``[d_sae, n_bins]``, counts of positive activations in
    :data:`HIST_EDGES`' bins; ``act_sum`` the sum of each feature's activations;
    ``n_tokens`` the positions read.
    """

    n: int
    left: int
    right: int
    values: dict[Key, Float[Tensor, "d_sae n"]]
    doc: dict[Key, Int[Tensor, "d_sae n"]]
    pos: dict[Key, Int[Tensor, "d_sae n"]]
    window_tokens: dict[Key, Int[Tensor, "d_sae n w"]]
    window_acts: dict[Key, Float[Tensor, "d_sae n w"]]
    hist: dict[Key, Int[Tensor, "d_sae n_bins"]]
    act_sum: dict[Key, Float[Tensor, " d_sae"]]
    n_tokens: int
    meta: dict[str, Any]

    def __repr__(self) -> str:
        features = sum(v.shape[0] for v in self.values.values())
        return (f"TopContexts({len(self.values)} SAEs, {features:,} features, top {self.n} contexts each, "
                f"over {self.n_tokens:,} tokens)")

    # -- reading -------------------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self.values

    def alive(self) -> dict[Key, Tensor]:
        """Per SAE, a bool mask ``[d_sae]`` of the features that fired at least once on the texts read."""
        return {key: counts.sum(1) > 0 for key, counts in self.hist.items()}

    def _ref(self, ref: FeatureRef | str) -> FeatureRef:
        ref = FeatureRef.parse(ref)
        if ref.key not in self.values:
            raise UnknownFeatureError(f"no contexts for {ref.key}: collected for {sorted(self.values)}")
        if not 0 <= ref.index < self.values[ref.key].shape[0]:
            raise InvalidArgumentError(f"{ref}: index outside 0..{self.values[ref.key].shape[0] - 1}")
        return ref

    def highlighted(self, ref: FeatureRef | str, tokenizer: Any = None, *, left: int | None = None,
                    right: int | None = None) -> list[Highlighted]:
        """The feature's top contexts token by token, with its activation on each (for shading)."""
        ref = self._ref(ref)
        left = self.left if left is None else min(left, self.left)
        right = self.right if right is None else min(right, self.right)
        out = []
        rows = zip(self.values[ref.key][ref.index].tolist(), self.doc[ref.key][ref.index].tolist(),
                   self.window_tokens[ref.key][ref.index].tolist(), self.window_acts[ref.key][ref.index].tolist(),
                   strict=True)
        for value, doc, tokens, acts in rows:
            if doc < 0:
                break
            span = range(self.left - left, self.left + right + 1)
            kept = [i for i in span if tokens[i] >= 0]
            out.append(Highlighted([_decode(tokenizer, tokens[i]) for i in kept], [acts[i] for i in kept],
                                   kept.index(self.left), value))
        return out

    def examples(self, ref: FeatureRef | str, tokenizer: Any = None, *, window: int = 8) -> list[Example]:
        """The feature's top examples as text, the firing token in [brackets], ``window`` tokens each side."""
        ref = self._ref(ref)
        out = []
        for h, doc, pos in zip(self.highlighted(ref, tokenizer, left=window, right=window),
                               self.doc[ref.key][ref.index].tolist(), self.pos[ref.key][ref.index].tolist(),
                               strict=False):
            out.append(Example(h.activation, _marked(h), doc, pos))
        return out

    def firing_tokens(self, ref: FeatureRef | str, tokenizer: Any = None, k: int = 3) -> list[str]:
        """The ``k`` tokens the feature fires on most among its top contexts (summed activation)."""
        weights: Counter[str] = Counter()
        for h in self.highlighted(ref, tokenizer, left=0, right=0):
            weights[h.pieces[h.firing].strip() or h.pieces[h.firing]] += h.activation
        return [token for token, _ in weights.most_common(k)]

    def label(self, ref: FeatureRef | str, tokenizer: Any = None, *, k: int = 3, window: int = 4,
              max_chars: int = 80) -> str:
        """A short readable label: the tokens it fires on most, then its best context, firing token in [brackets].

        ``"(never fired)"`` for a feature that did not fire on the texts read.
        """
        top = self.highlighted(ref, tokenizer, left=window, right=1)
        if not top:
            return "(never fired)"
        tokens = " · ".join(repr(t)[1:-1] for t in self.firing_tokens(ref, tokenizer, k))
        context = " ".join(_marked(top[0]).split())
        text = f"{tokens} — …{context}"
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    def histogram(self, ref: FeatureRef | str) -> tuple[Float[Tensor, " n_edges"], Int[Tensor, " n_bins"]]:
        """``(edges, counts)`` of the feature's positive activations (log-spaced bins, :data:`HIST_EDGES`)."""
        ref = self._ref(ref)
        return HIST_EDGES.clone(), self.hist[ref.key][ref.index].clone()

    def density(self, ref: FeatureRef | str) -> float:
        """The share of the positions read where the feature fired (activation > 0)."""
        ref = self._ref(ref)
        return float(self.hist[ref.key][ref.index].sum()) / max(self.n_tokens, 1)

    def mean_active(self, ref: FeatureRef | str) -> float:
        """The feature's mean activation where it fired (0 when it never did)."""
        ref = self._ref(ref)
        fired = int(self.hist[ref.key][ref.index].sum())
        return float(self.act_sum[ref.key][ref.index]) / fired if fired else 0.0

    def quantile(self, ref: FeatureRef | str, q: float) -> float:
        """The ``q`` quantile of the feature's positive activations, read off the histogram
        (geometric interpolation within a bin: relative error below 12%); 0 if it never fired."""
        if not 0.0 <= q <= 1.0:
            raise InvalidArgumentError(f"q={q}: expected a quantile in [0, 1]")
        ref = self._ref(ref)
        counts = self.hist[ref.key][ref.index].double()
        total = float(counts.sum())
        if total == 0:
            return 0.0
        cumulative = counts.cumsum(0)
        b = int(torch.searchsorted(cumulative, torch.tensor([q * total], dtype=torch.float64)).clamp(max=_N_BINS - 1))
        before = float(cumulative[b - 1]) if b > 0 else 0.0
        within = (q * total - before) / max(float(counts[b]), 1.0)
        return 10 ** (_LOG_LO + _LOG_STEP * (b + within))

    # -- merging -------------------------------------------------------------------------------------
    @classmethod
    def merge(cls, parts: Sequence[TopContexts], *, meta: dict[str, Any] | None = None) -> TopContexts:
        """The table of all the parts' rows together, from tables of shards of them (what ranks that each
        read some rows of one text send back).

        Each part is :func:`collect_top_contexts` over some rows of the same text, numbered as in the
        whole (``first_doc``), with the same SAEs and settings; no row in two parts. The top contexts
        are ranked again by (activation descending, doc, position), the order one pass keeps them in;
        histograms and token counts add up. The result equals one pass over all the rows exactly
        (same activations: shards cut at multiples of the pass's ``batch_size`` see the same batches),
        except ``act_sum``, float64 sums added in another order (equal to about 1e-15, relative).

        ``meta``: the whole pass's (:func:`contexts_meta` of the SAEs and all the rows); by default the
        first part's, without its shard's token digest and ``first_doc``.
        """
        parts = list(parts)
        if not parts or not all(isinstance(p, TopContexts) for p in parts):
            raise InvalidArgumentError(f"TopContexts.merge needs a non-empty list of TopContexts, got "
                                       f"{[type(p).__name__ for p in parts] or 'none'}")
        first = parts[0]

        def settings(part: TopContexts) -> dict[str, Any]:
            shapes = {key: tuple(v.shape) for key, v in part.values.items()}
            other = {k: v for k, v in part.meta.items() if k not in ("tokens", "first_doc")}
            return {"n": part.n, "left": part.left, "right": part.right, "shapes": shapes, "meta": other}

        expected = settings(first)
        for i, part in enumerate(parts[1:], start=1):
            found = settings(part)
            if found != expected:
                differ = sorted(k for k in expected if found[k] != expected[k])
                raise InvalidArgumentError(f"part {i} of the merge differs from part 0 in {differ}: expected "
                                           "tables of the same SAEs and settings, over other rows of one text")
        tables: dict[str, dict[Key, Tensor]] = {name: {} for name in cls._TABLES}
        for key in first.values:
            values = torch.cat([p.values[key] for p in parts], dim=1)          # [d_sae, parts * n]
            doc = torch.cat([p.doc[key] for p in parts], dim=1)
            pos = torch.cat([p.pos[key] for p in parts], dim=1)
            order = pos.argsort(dim=1, stable=True)                           # lexicographic: the last key first
            order = order.gather(1, doc.gather(1, order).argsort(dim=1, stable=True))
            order = order.gather(1, values.gather(1, order).argsort(dim=1, descending=True, stable=True))
            keep = order[:, :first.n]                                         # blank slots (0, doc -1) sort last
            tables["values"][key] = values.gather(1, keep)
            tables["doc"][key], tables["pos"][key] = doc.gather(1, keep), pos.gather(1, keep)
            for name in ("window_tokens", "window_acts"):
                tables[name][key] = _take(torch.cat([getattr(p, name)[key] for p in parts], dim=1), keep)
            tables["hist"][key] = sum((p.hist[key] for p in parts[1:]), parts[0].hist[key].clone())
            tables["act_sum"][key] = sum((p.act_sum[key] for p in parts[1:]), parts[0].act_sum[key].clone())
        if meta is None:
            meta = {k: v for k, v in first.meta.items() if k != "first_doc"} | {"tokens": None}
        return cls(first.n, first.left, first.right, **tables, n_tokens=sum(p.n_tokens for p in parts),
                   meta=dict(meta))

    # -- saving --------------------------------------------------------------------------------------
    _TABLES = ("values", "doc", "pos", "window_tokens", "window_acts", "hist", "act_sum")

    def save(self, path: str | Path) -> Path:
        """Write to folder ``path`` atomically (safetensors + checksummed manifest)."""
        from safetensors.torch import save_file

        tensors = {f"{site}.{layer}.{name}": getattr(self, name)[(site, layer)].contiguous()
                   for (site, layer) in self.values for name in self._TABLES}
        with atomic_directory(path) as tmp:
            save_file(tensors, tmp / "contexts.safetensors")
            write_manifest(tmp, _MANIFEST, {**header("TopContexts", _SCHEMA), "n": self.n, "left": self.left,
                                            "right": self.right, "n_tokens": self.n_tokens, "meta": self.meta,
                                            "keys": [list(k) for k in self.values]})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TopContexts:
        from safetensors.torch import load_file

        recover_directory(path)              # a save killed between its two renames left the old table aside
        manifest = read_manifest(path, _MANIFEST)
        check_header(manifest, "TopContexts", _SCHEMA, path)
        tensors = load_file(Path(path) / "contexts.safetensors")
        keys = [(site, int(layer)) for site, layer in manifest["keys"]]
        tables = {name: {k: tensors[f"{k[0]}.{k[1]}.{name}"] for k in keys} for name in cls._TABLES}
        return cls(manifest["n"], manifest["left"], manifest["right"], **tables, n_tokens=manifest["n_tokens"],
                   meta=manifest["meta"])


def _marked(context: Highlighted) -> str:
    """A context as text, its firing token in [brackets]."""
    pieces = list(context.pieces)
    pieces[context.firing] = _mark(pieces[context.firing])
    return "".join(pieces)


def _mark(piece: str) -> str:
    """The firing token in [brackets], its leading space outside: ``" Lord"`` -> ``" [Lord]"``."""
    body = piece.lstrip()
    return piece[: len(piece) - len(body)] + f"[{body or piece}]" if body else f"[{piece}]"


def _decode(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else f"<{token}>"


class _Running:
    """The running state of one SAE: top-n with windows, histogram, sums."""

    def __init__(self, d_sae: int, n: int, width: int):
        self.values = torch.zeros(d_sae, 0)
        self.where = torch.zeros(d_sae, 0, 2, dtype=torch.int64)            # (doc, pos)
        self.window_tokens = torch.zeros(d_sae, 0, width, dtype=torch.int64)
        self.window_acts = torch.zeros(d_sae, 0, width)
        self.hist = torch.zeros(d_sae * _N_BINS, dtype=torch.int64)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.n = n

    def update(self, acts: Float[Tensor, "b p d_sae"], tokens: Int[Tensor, "b p"], first_doc: int, offset: int,
               left: int, right: int) -> None:
        b, p, d_sae = acts.shape
        scored = acts[:, offset:].reshape(-1, d_sae)                        # [b * p', d_sae]
        fired = scored > 0
        rows, feats = fired.nonzero(as_tuple=True)
        logs = scored[rows, feats].double().log10()
        bins = ((logs - _LOG_LO) / _LOG_STEP).floor().clamp(0, _N_BINS - 1).long()
        self.hist += torch.bincount(feats * _N_BINS + bins, minlength=d_sae * _N_BINS)
        self.act_sum += scored.double().sum(0)
        m = min(self.n, scored.shape[0])
        top_values, top_rows = _ordered_topk(scored.T, m)                   # [d_sae, m]; ties: earlier row first
        docs, positions = top_rows // (p - offset), top_rows % (p - offset) + offset
        span = torch.arange(-left, right + 1)
        padded_acts = torch.nn.functional.pad(acts, (0, 0, left, right))    # [b, p + left + right, d_sae]
        padded_tokens = torch.nn.functional.pad(tokens, (left, right), value=-1)
        at = positions[..., None] + left + span                             # [d_sae, m, width]
        feature = torch.arange(d_sae)[:, None, None]
        window_acts = padded_acts[docs[..., None], at, feature]
        window_tokens = padded_tokens[docs[..., None], at]
        where = torch.stack([docs + first_doc, positions], dim=-1)
        values = torch.cat([self.values, top_values], dim=1)                # kept (earlier texts) first
        self.values, keep = _ordered_topk(values, min(self.n, values.shape[1]))   # [d_sae, n]
        self.where = _take(torch.cat([self.where, where], dim=1), keep)
        self.window_tokens = _take(torch.cat([self.window_tokens, window_tokens], dim=1), keep)
        self.window_acts = _take(torch.cat([self.window_acts, window_acts], dim=1), keep)


def _take(table: Tensor, keep: Int[Tensor, "d k"]) -> Tensor:
    return table.gather(1, keep[..., None].expand(-1, -1, table.shape[-1]))


def _ordered_topk(values: Float[Tensor, "d m"], k: int) -> tuple[Float[Tensor, "d k"], Int[Tensor, "d k"]]:
    """``values.topk(k, dim=1)``, with equal positive values in column order (the lower column first).

    The order a top context is kept in is then a function of the texts alone: (activation
    descending, then doc, then position), whatever the batches or shards the texts came in (so
    :meth:`TopContexts.merge` of shards equals one pass). ``torch.topk``'s own tie order is
    unspecified; k+1 values show every tie that could matter, and only the rows with a tie
    among positive values (rare with float activations; zeros are blank slots) are redone
    with a stable sort.
    """
    top_values, top_index = values.topk(min(k + 1, values.shape[1]), dim=1)
    tied = ((top_values[:, 1:] == top_values[:, :-1]) & (top_values[:, 1:] > 0)).any(dim=1)
    top_values, top_index = top_values[:, :k], top_index[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sorted_values, sorted_index = torch.sort(values[rows], dim=1, descending=True, stable=True)
        top_values[rows], top_index[rows] = sorted_values[:, :k], sorted_index[:, :k]
    return top_values, top_index


@torch.no_grad()
def collect_top_contexts(
    model: HookedTransformer,
    bank: SAEBank,
    tokens: Int[Tensor, "n_doc seq"] | Iterable[Int[Tensor, "batch seq"]],
    *,
    n: int = 10,
    batch_size: int = 8,
    left: int = 12,
    right: int = 4,
    sites: list[Site] | None = None,
    layers: list[int] | None = None,
    skip_first: bool = True,
    path: str | Path | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    first_doc: int = 0,
) -> TopContexts:
    """One pass over ``tokens`` keeping each feature's ``n`` strongest contexts and its histogram.

    Args:
        model: a FlowTransformer (or a HookedTransformer, wrapped without copying).
        bank: the SAEs to read (optionally restricted by ``sites``/``layers``).
        tokens: ``[n_doc, seq]`` token ids read ``batch_size`` rows at a time, or any
            iterable of ``[batch, seq]`` batches (a stream: never held whole).
        left, right: tokens kept on each side of a firing position (with their activations).
        skip_first: ignore position 0 as a firing position (BOS / attention-sink outliers).
        path: a cache folder: loaded when it holds contexts of the same bank, tokens and
            settings, else computed and written there (a stream has no digest: not cached).
        device: where the model runs (default: where its weights are).
        first_doc: the number of the first row in ``doc`` (a shard of a larger text's rows numbers
            them as the whole text does, so that :meth:`TopContexts.merge` of the shards equals one pass).

    Ties (equal activations) are kept in text order, earlier row and position first.
    """
    from tqdm.auto import tqdm

    from tl_featureflow.model import FlowTransformer

    check_int(n, "n", low=1), check_int(batch_size, "batch_size", low=1)
    check_int(left, "left"), check_int(right, "right"), check_int(first_doc, "first_doc")
    chosen = bank.select(sites=sites, layers=layers)
    is_tensor = isinstance(tokens, Tensor)
    if is_tensor:
        check_tokens(tokens, model.cfg.d_vocab, n_ctx=model.cfg.n_ctx)
    meta = contexts_meta(chosen, tokens if is_tensor else None, n=n, left=left, right=right, skip_first=skip_first)
    if first_doc:
        meta["first_doc"] = first_doc
    if path is not None and is_tensor:
        cached = _load_matching(Path(path), meta)
        if cached is not None:
            return cached
    flow = FlowTransformer.from_hooked(model)
    device = torch.device(device) if device is not None else next(flow.parameters()).device
    offset = 1 if skip_first else 0
    state = {key: _Running(sae.cfg.d_sae, n, left + 1 + right) for key, sae in chosen.items()}
    total = -(-tokens.shape[0] // batch_size) if is_tensor else None
    n_docs, n_tokens = first_doc, 0
    for batch in tqdm(token_batches(tokens, batch_size), total=total, desc="feature contexts", unit="batch",
                      disable=not progress):
        if not is_tensor:
            check_tokens(batch, model.cfg.d_vocab, n_ctx=model.cfg.n_ctx)
        n_ctx = getattr(model.cfg, "n_ctx", None)
        if batch.shape[1] <= offset or (n_ctx is not None and batch.shape[1] > n_ctx):
            raise InvalidArgumentError(f"token rows of length {batch.shape[1]}: expected more than {offset} and at "
                                       f"most the model's n_ctx ({n_ctx})")
        _, feats = flow.run_with_features(batch.to(device), bank=chosen, return_logits=False)
        for key, acts in feats.items():
            state[key].update(acts.float().cpu(), batch.cpu(), n_docs, offset, left, right)
        n_docs += batch.shape[0]
        n_tokens += batch.shape[0] * (batch.shape[1] - offset)
    result = _finish(state, n, left, right, n_tokens, meta)
    if path is not None and is_tensor:
        result.save(path)
    return result


def contexts_meta(bank: SAEBank, tokens: Tensor | None, *, n: int, left: int, right: int,
                  skip_first: bool) -> dict[str, Any]:
    """The ``meta`` of :func:`collect_top_contexts` over ``tokens`` (None: a stream, no digest) with ``bank``
    (already restricted to the SAEs read): what a cached or merged table must agree with."""
    return {"bank_fingerprint": bank.fingerprint(), "tokens": tensor_digest(tokens) if tokens is not None else None,
            "n": n, "left": left, "right": right, "skip_first": skip_first, "keys": [list(k) for k in bank]}


def _finish(state: dict[Key, _Running], n: int, left: int, right: int, n_tokens: int,
            meta: dict[str, Any]) -> TopContexts:
    """Pad every table to ``n`` slots and blank the slots of positions that did not fire."""
    tables: dict[str, dict[Key, Tensor]] = {name: {} for name in TopContexts._TABLES}
    for key, run in state.items():
        d_sae, pad = run.values.shape[0], n - run.values.shape[1]
        values, where = run.values, run.where
        window_tokens, window_acts = run.window_tokens, run.window_acts
        if pad > 0:
            values = torch.cat([values, torch.zeros(d_sae, pad)], dim=1)
            where = torch.cat([where, torch.full((d_sae, pad, 2), -1, dtype=torch.int64)], dim=1)
            window_tokens = torch.cat([window_tokens, torch.full((d_sae, pad, window_tokens.shape[-1]), -1,
                                                                 dtype=torch.int64)], dim=1)
            window_acts = torch.cat([window_acts, torch.zeros(d_sae, pad, window_acts.shape[-1])], dim=1)
        fired = values > 0
        tables["values"][key] = torch.where(fired, values, 0.0)
        tables["doc"][key] = torch.where(fired, where[..., 0], -1)
        tables["pos"][key] = torch.where(fired, where[..., 1], -1)
        tables["window_tokens"][key] = torch.where(fired[..., None], window_tokens, -1)
        tables["window_acts"][key] = torch.where(fired[..., None], window_acts, 0.0)
        tables["hist"][key] = run.hist.view(d_sae, _N_BINS)
        tables["act_sum"][key] = run.act_sum
    return TopContexts(n, left, right, **tables, n_tokens=n_tokens, meta=meta)


def _load_matching(path: Path, meta: dict[str, Any]) -> TopContexts | None:
    if not (path / _MANIFEST).is_file():
        return None
    try:
        cached = TopContexts.load(path)
    except CacheError:
        return None
    return cached if cached.meta == meta else None


def contexts_dir(bank: SAEBank, tokens: Tensor, **settings: Any) -> Path:
    """Where :func:`feature_contexts` caches the contexts of ``bank`` on ``tokens``: under the
    bank's fingerprint, so a retrained or edited bank never reads stale contexts."""
    key = hashlib.sha256(json.dumps([tensor_digest(tokens), settings], sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "contexts" / bank.fingerprint()[:16] / key


def feature_contexts(
    model: HookedTransformer,
    bank: SAEBank,
    tokens: Int[Tensor, "n_doc seq"] | None = None,
    *,
    n: int = 10,
    rows: int = DEFAULT_CONTEXT_ROWS,
    batch_size: int = 8,
    cache: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TopContexts:
    """The contexts of every feature of ``bank``, computed once and cached.

    ``tokens`` default to the first ``rows`` rows (128 tokens each) of the offline
    corpus's held-out split (the SAEs never trained on them), which needs the model's
    tokenizer. The result is cached under the bank's fingerprint and the tokens'
    digest (:func:`contexts_dir`): the first call for a bank pays one streaming pass,
    later ones load it; a changed bank or other texts compute afresh. Pass your own
    ``tokens`` to label features by your texts.
    """
    check_int(n, "n", low=1), check_int(rows, "rows", low=1), check_int(batch_size, "batch_size", low=1)
    if tokens is None:
        backend = backend_of(model)
        if backend.tokenizer is None:
            raise InvalidArgumentError("feature_contexts needs token ids (tokens=...) for a model without a tokenizer")
        from tl_featureflow.saes.corpus import load_corpus

        tokens = load_corpus(backend.tokenizer, "heldout", progress=progress).tokens[:rows]
        tokens = tokens[:, : backend.n_ctx if backend.n_ctx is not None else tokens.shape[1]]
    if not cache:
        return collect_top_contexts(model, bank, tokens, n=n, batch_size=batch_size, device=device, progress=progress)
    folder = contexts_dir(bank, tokens, n=n)
    try:
        with entry_lock(folder):          # two notebooks asking at once compute it once
            return collect_top_contexts(model, bank, tokens, n=n, batch_size=batch_size, path=folder, device=device,
                                        progress=progress)
    except PermissionError:               # a read-only cache: serve what it holds, else compute without caching
        if (folder / _MANIFEST).is_file():
            return collect_top_contexts(model, bank, tokens, n=n, batch_size=batch_size, path=folder, device=device,
                                        progress=progress)
        warnings.warn(f"the contexts cache {folder.parent} is read-only: computing the top contexts without "
                      "caching them (set TL_FEATUREFLOW_CACHE to a writable folder to keep them)", stacklevel=2)
        return collect_top_contexts(model, bank, tokens, n=n, batch_size=batch_size, device=device, progress=progress)

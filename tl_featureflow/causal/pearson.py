"""Pearson matching from a token stream of its own (the paper: 100K tokens), in bounded memory, cached.

For each res(L) feature, the feature of res(L-1), mlp(L) and att(L) whose activations
correlate best with it over the stream's tokens (position 0 skipped). Only running sums
are kept: per site ``sum x``, ``sum x^2`` ``[d_pred]``, ``sum y``, ``sum y^2`` ``[d_res]`` and
``sum x y`` ``[d_res, d_pred]`` (float64), so memory does not grow with the stream:

    corr(x, y) = (N sum xy - sum x sum y) / sqrt((N sum x^2 - (sum x)^2) (N sum y^2 - (sum y)^2))

A feature that never varies has no match (index -1).

>>> import torch
>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> model, (bank, _) = tiny_model(), planted_chain_bank()
>>> stream = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
>>> matches = pearson_matches(model, bank, [2], tokens=stream, progress=False)
>>> sorted(matches), matches[(2, "res")].shape
([(2, 'att'), (2, 'mlp'), (2, 'res')], torch.Size([12, 1]))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow._files import atomic_directory, cache_root, entry_lock, read_manifest, tensor_digest, write_manifest
from tl_featureflow.backend import ModelBackend, backend_of
from tl_featureflow.checks import check_tokens
from tl_featureflow.errors import BankError, CacheError, InvalidArgumentError
from tl_featureflow.refs import Site, predecessor_keys
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.stream import token_batches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["PearsonMatches", "pearson_matches", "training_rows", "correlation_argmax", "DEFAULT_PEARSON_TOKENS"]

_IDENTITY = ("bank_fingerprint", "layers", "tokens")
#: The paper estimated correlations on 100K tokens (its appendix C.4).
DEFAULT_PEARSON_TOKENS = 100_000


class PearsonMatches(dict):
    """``{(layer, site): Tensor[d_res, 1]}``: per res(layer) feature, its best-correlated predecessor
    of ``site`` (-1: none); ``meta`` says what stream it came from (source, tokens, bank)."""

    def __init__(self, matches: dict[tuple[int, Site], Tensor], meta: dict[str, Any]):
        super().__init__(matches)
        self.meta = meta


class _Sums:
    def __init__(self, d_res: int, d_pred: int):
        self.n = 0
        self.x = torch.zeros(d_pred, dtype=torch.float64)
        self.xx = torch.zeros(d_pred, dtype=torch.float64)
        self.y = torch.zeros(d_res, dtype=torch.float64)
        self.yy = torch.zeros(d_res, dtype=torch.float64)
        self.xy = torch.zeros(d_res, d_pred, dtype=torch.float64)

    def add(self, x: Float[Tensor, "t d_pred"], y: Float[Tensor, "t d_res"]) -> None:
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.x += x.sum(0)
        self.xx += (x * x).sum(0)
        self.y += y.sum(0)
        self.yy += (y * y).sum(0)
        self.xy += y.T @ x


def correlation_argmax(n: int, x: Tensor, xx: Tensor, y: Tensor, yy: Tensor, xy: Tensor) -> Int[Tensor, "d_res 1"]:
    """The argmax over predecessors of the Pearson correlation, from running sums (-1: no match)."""
    var_x = n * xx - x * x
    var_y = n * yy - y * y
    ok_x, ok_y = var_x > 1e-12 * n * n, var_y > 1e-12 * n * n
    cov = n * xy - y[:, None] * x[None, :]
    corr = cov / (var_y.clamp_min(1e-300).sqrt()[:, None] * var_x.clamp_min(1e-300).sqrt()[None, :])
    corr[:, ~ok_x] = float("-inf")
    best = corr.argmax(dim=1)
    best[~ok_y | torch.isinf(corr.max(dim=1).values)] = -1
    return best[:, None]


def training_rows(model: HookedTransformer | ModelBackend, n_tokens: int, *,
                  progress: bool = True) -> Int[Tensor, "rows seq"]:
    """The offline corpus's training-split rows (cut to the model's ``n_ctx``) holding about ``n_tokens``
    tokens after position 0 (the default stream of :func:`pearson_matches`)."""
    from tl_featureflow.saes.corpus import load_corpus

    backend = backend_of(model)
    rows = load_corpus(backend.tokenizer, "train", progress=progress).tokens
    rows = rows[:, : backend.n_ctx if backend.n_ctx is not None else rows.shape[1]]
    return rows[: -(-n_tokens // (rows.shape[1] - 1))]


@torch.no_grad()
def pearson_matches(
    model: HookedTransformer,
    bank: SAEBank,
    layers: Sequence[int],
    *,
    tokens: Int[Tensor, "rows seq"] | Iterable[Tensor] | None = None,
    n_tokens: int = DEFAULT_PEARSON_TOKENS,
    batch_size: int = 8,
    cache: bool = True,
    source: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> PearsonMatches:
    """Best-correlated predecessors of every res feature of ``layers``, from a token stream.

    ``tokens`` default to the offline corpus's *training* split (not the held-out texts
    validation reads), its first rows up to ``n_tokens`` tokens; that default is cached
    under the bank's fingerprint (``<cache>/pearson/...``). Pass ``tokens`` (a tensor, or
    an iterable of batches) to correlate over your own stream (a tensor is cached too);
    ``source`` names it in ``meta``.
    """
    from tqdm.auto import tqdm

    from tl_featureflow.model import FlowTransformer

    if n_tokens < 2:
        raise InvalidArgumentError(f"n_tokens={n_tokens}: expected at least 2")
    pred_keys = {layer: {site: key for site, key in predecessor_keys(layer).items() if key in bank} for layer in layers}
    for layer in layers:
        if ("res", layer) not in bank or not pred_keys[layer]:
            raise BankError(f"layer {layer} needs a res SAE and a predecessor SAE: the bank has {bank.describe()}")
    if tokens is None:
        if getattr(model, "tokenizer", None) is None:
            raise InvalidArgumentError("pearson_matches needs tokens=... for a model without a tokenizer")
        tokens = training_rows(model, n_tokens, progress=progress)
        source = "offline corpus, train split"
    else:
        source = source or "given tokens"
    keys = sorted({("res", layer) for layer in layers} | {k for d in pred_keys.values() for k in d.values()})
    needed = bank.select(sites=sorted({k[0] for k in keys}), layers=sorted({k[1] for k in keys}))
    meta: dict[str, Any] = {"source": source, "bank_fingerprint": bank.fingerprint(), "layers": list(layers)}
    folder = None
    if cache and isinstance(tokens, Tensor):
        check_tokens(tokens, backend_of(model).d_vocab, n_ctx=backend_of(model).n_ctx)
        meta["tokens"] = tensor_digest(tokens)
        identity = {k: meta[k] for k in _IDENTITY}           # what the result depends on (not its name)
        key = hashlib.sha256(json.dumps({**identity, "source": "given tokens"}, sort_keys=True).encode()).hexdigest()[:16]
        folder = cache_root() / "pearson" / bank.fingerprint()[:16] / key
        cached = _load(folder, meta)
        if cached is not None:
            return cached
    with entry_lock(folder) if folder is not None else nullcontext():
        if folder is not None and (cached := _load(folder, meta)) is not None:
            return cached
        flow = FlowTransformer.from_hooked(model)
        device = torch.device(device) if device is not None else next(flow.parameters()).device
        sums = {(layer, site): _Sums(bank.d_sae("res", layer), bank.d_sae(*key))
                for layer in layers for site, key in pred_keys[layer].items()}
        seen = 0
        total = -(-tokens.shape[0] // batch_size) if isinstance(tokens, Tensor) else None
        for batch in tqdm(token_batches(tokens, batch_size), total=total, desc="pearson", unit="batch",
                          disable=not progress):
            check_tokens(batch, backend_of(model).d_vocab, n_ctx=backend_of(model).n_ctx, min_pos=2)
            _, feats = flow.run_with_features(batch.to(device), bank=needed, return_logits=False)
            flat = {k: feats[k][:, 1:].reshape(-1, feats[k].shape[-1]).cpu() for k in keys}
            for (layer, site), s in sums.items():
                s.add(flat[pred_keys[layer][site]], flat[("res", layer)])
            seen += flat[keys[0]].shape[0]
        matches = {k: correlation_argmax(s.n, s.x, s.xx, s.y, s.yy, s.xy) for k, s in sums.items()}
        meta["n_tokens"] = seen
        result = PearsonMatches(matches, meta)
        if folder is not None:
            _save(folder, result)
    return result


def _save(folder: Any, result: PearsonMatches) -> None:
    from safetensors.torch import save_file

    with atomic_directory(folder) as tmp:
        save_file({f"{layer}.{site}": t.contiguous() for (layer, site), t in result.items()}, tmp / "pearson.safetensors")
        write_manifest(tmp, "pearson.json", {"meta": result.meta})


def _load(folder: Any, meta: dict[str, Any]) -> PearsonMatches | None:
    try:
        manifest = read_manifest(folder, "pearson.json")
        from safetensors.torch import load_file

        tensors = load_file(folder / "pearson.safetensors")
    except (CacheError, OSError):
        return None
    saved = manifest["meta"]
    if any(saved.get(k) != meta.get(k) for k in _IDENTITY):
        return None
    matches = {(int(name.split(".")[0]), name.split(".")[1]): t for name, t in tensors.items()}
    return PearsonMatches(matches, {**saved, "source": meta["source"]})

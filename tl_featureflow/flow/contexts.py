"""Top activating contexts of every feature, collected in one streaming pass.

Like Neuronpedia's dashboards: for each feature, the ``n`` token positions (over the
given texts) where it fires hardest, with the surrounding tokens. Memory stays
bounded: a running top-``n`` per feature (``[d_sae, n]`` per SAE) is merged batch by
batch; activations are never all kept.

>>> import torch
>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> model, (bank, _) = tiny_model(), planted_chain_bank()
>>> tokens = torch.randint(0, 100, (6, 16), generator=torch.Generator().manual_seed(0))
>>> contexts = collect_top_contexts(model, bank, tokens, n=3, sites=["res"], layers=[2], progress=False)
>>> best = contexts.examples("2/res/1", window=2)[0]     # with a tokenizer: text instead of token ids
>>> best.activation >= contexts.examples("2/res/1")[-1].activation
True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow._files import atomic_directory, check_header, header, read_manifest, tensor_digest, write_manifest
from tl_featureflow.checks import check_tokens
from tl_featureflow.errors import CacheError, FeatureFlowError, InvalidArgumentError
from tl_featureflow.refs import FeatureRef, Key, Site
from tl_featureflow.saes.bank import SAEBank

__all__ = ["TopContexts", "Example", "collect_top_contexts"]

_MANIFEST = "contexts.json"
_SCHEMA = 1


class Example(NamedTuple):
    activation: float
    text: str
    doc: int
    pos: int


@dataclass
class TopContexts:
    """Per SAE: ``values``/``doc``/``pos`` of shape ``[d_sae, n]``, strongest first.

    Empty slots (a feature that fired fewer than ``n`` times) have value 0 and doc -1.
    ``tokens`` are the sequences the positions index into.
    """

    n: int
    values: dict[Key, Float[Tensor, "d_sae n"]]
    doc: dict[Key, Int[Tensor, "d_sae n"]]
    pos: dict[Key, Int[Tensor, "d_sae n"]]
    tokens: Int[Tensor, "n_doc seq"]
    meta: dict[str, Any]

    def examples(self, ref: FeatureRef | str, tokenizer: Any = None, *, window: int = 8) -> list[Example]:
        """The feature's top examples, the firing token in [brackets] with ``window`` tokens around."""
        ref = FeatureRef.parse(ref)
        if ref.key not in self.values:
            raise FeatureFlowError(f"no contexts for {ref.key}: collected for {sorted(self.values)}")
        out = []
        for value, doc, pos in zip(*(t[ref.key][ref.index].tolist() for t in (self.values, self.doc, self.pos)), strict=False):
            if doc < 0:
                break
            row = self.tokens[doc].tolist()
            pieces = [_decode(tokenizer, row[i]) for i in range(max(0, pos - window), min(len(row), pos + window + 1))]
            pieces[pos - max(0, pos - window)] = f"[{pieces[pos - max(0, pos - window)]}]"
            out.append(Example(value, "".join(pieces), doc, pos))
        return out

    def save(self, path: str | Path) -> Path:
        """Write to folder ``path`` atomically (safetensors + checksummed manifest)."""
        from safetensors.torch import save_file

        tensors = {"tokens": self.tokens.contiguous()}
        for (site, layer) in self.values:
            for name, table in (("values", self.values), ("doc", self.doc), ("pos", self.pos)):
                tensors[f"{site}.{layer}.{name}"] = table[(site, layer)].contiguous()
        with atomic_directory(path) as tmp:
            save_file(tensors, tmp / "contexts.safetensors")
            write_manifest(tmp, _MANIFEST, {**header("TopContexts", _SCHEMA), "n": self.n, "meta": self.meta,
                                            "keys": [list(k) for k in self.values]})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TopContexts:
        from safetensors.torch import load_file

        manifest = read_manifest(path, _MANIFEST)
        check_header(manifest, "TopContexts", _SCHEMA, path)
        tensors = load_file(Path(path) / "contexts.safetensors")
        keys = [(site, int(layer)) for site, layer in manifest["keys"]]
        tables = {name: {k: tensors[f"{k[0]}.{k[1]}.{name}"] for k in keys} for name in ("values", "doc", "pos")}
        return cls(manifest["n"], tables["values"], tables["doc"], tables["pos"], tensors["tokens"], manifest["meta"])


def _decode(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else f"<{token}>"


@torch.no_grad()
def collect_top_contexts(
    model: Any,
    bank: SAEBank,
    tokens: Int[Tensor, "n_doc seq"],
    *,
    n: int = 10,
    batch_size: int = 8,
    sites: list[Site] | None = None,
    layers: list[int] | None = None,
    skip_first: bool = True,
    path: str | Path | None = None,
    progress: bool = True,
) -> TopContexts:
    """One pass over ``tokens`` keeping each feature's ``n`` strongest activations.

    Args:
        model: a FlowTransformer (or a HookedTransformer, wrapped without copying).
        bank: the SAEs to read (optionally restricted by ``sites``/``layers``).
        tokens: ``[n_doc, seq]`` token ids.
        skip_first: ignore position 0 (BOS / attention-sink activations are outliers).
        path: a cache folder: loaded when it holds contexts of the same bank, tokens and
            settings, else computed and written there.
    """
    from tqdm.auto import tqdm

    from tl_featureflow.model import FlowTransformer

    check_tokens(tokens, model.cfg.d_vocab)
    if n < 1 or batch_size < 1:
        raise InvalidArgumentError(f"n={n} and batch_size={batch_size} must be positive")
    chosen = bank.select(sites=sites, layers=layers)
    meta = {"bank_fingerprint": chosen.fingerprint(), "tokens": tensor_digest(tokens),
            "n": n, "skip_first": skip_first, "keys": [list(k) for k in chosen]}
    if path is not None and (Path(path) / _MANIFEST).is_file():
        try:
            cached = TopContexts.load(path)
            if cached.meta == meta:
                return cached
        except CacheError:
            pass
    flow = FlowTransformer.from_hooked(model)
    d_sae = {key: sae.cfg.d_sae for key, sae in chosen.items()}
    values = {k: torch.zeros(d, 0) for k, d in d_sae.items()}
    where = {k: torch.zeros(d, 0, dtype=torch.int64) for k, d in d_sae.items()}
    seq = tokens.shape[1]
    device = next(flow.parameters()).device
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="top contexts", unit="batch", disable=not progress):
        batch = tokens[start : start + batch_size].to(device)
        _, feats = flow.run_with_features(batch, bank=chosen, return_logits=False)
        for key, acts in feats.items():
            if skip_first:
                acts = acts[:, 1:]
            offset = 1 if skip_first else 0
            flat = acts.reshape(-1, acts.shape[-1]).T.float().cpu()       # [d_sae, b*p]
            width = acts.shape[1]
            ids = torch.arange(flat.shape[1])
            flat_where = (start + ids // width) * seq + (ids % width + offset)  # doc * seq + pos
            merged_values = torch.cat([values[key], flat], dim=1)
            merged_where = torch.cat([where[key], flat_where.expand(flat.shape[0], -1)], dim=1)
            top = merged_values.topk(min(n, merged_values.shape[1]), dim=1)
            values[key] = top.values
            where[key] = merged_where.gather(1, top.indices)
    out_values, out_doc, out_pos = {}, {}, {}
    for key in d_sae:
        v, w = values[key], where[key]
        pad = n - v.shape[1]
        if pad > 0:
            v = torch.cat([v, torch.zeros(v.shape[0], pad)], dim=1)
            w = torch.cat([w, torch.full((w.shape[0], pad), -1, dtype=torch.int64)], dim=1)
        fired = v > 0
        out_values[key] = torch.where(fired, v, torch.zeros_like(v))
        out_doc[key] = torch.where(fired, w // seq, torch.full_like(w, -1))
        out_pos[key] = torch.where(fired, w % seq, torch.full_like(w, -1))
    result = TopContexts(n, out_values, out_doc, out_pos, tokens.cpu(), meta)
    if path is not None:
        result.save(path)
    return result

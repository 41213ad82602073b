"""Synthetic SAE banks whose structure is known exactly, and a tiny model: for tests, docs, benchmarks.

>>> bank, truth = planted_chain_bank()
>>> truth.chain       # the residual chain, layer 0 to 3
['0/res/3', '1/res/7', '2/res/1', '3/res/5']
>>> model = tiny_model()          # 4 layers, d_model 64: fits the planted bank
>>> model.cfg.n_layers, model.cfg.d_model
(4, 64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor

from tl_featureflow.refs import Site, hook_name
from tl_featureflow.saes.bank import SAEBank

__all__ = ["sae_from_decoder", "planted_chain_bank", "random_bank", "PlantedTruth", "tiny_model"]

_ARCHS = {"standard": (StandardSAE, StandardSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
          "topk": (TopKSAE, TopKSAEConfig)}


@torch.no_grad()
def sae_from_decoder(site: Site, layer: int, W_dec: Float[Tensor, "d_sae d_model"], *,
                     arch: str = "standard", device: torch.device | str = "cpu") -> SAE:
    """An SAE with the given decoder rows and a tied encoder (``W_enc = W_dec^T``)."""
    cls, cfg_cls = _ARCHS[arch]
    extra = {"k": min(8, W_dec.shape[0])} if arch == "topk" else {}
    cfg = cfg_cls(d_in=W_dec.shape[1], d_sae=W_dec.shape[0], device="meta",
                  metadata=SAEMetadata(hook_name=hook_name(site, layer)), **extra)
    sae = cls(cfg)
    state = {"W_dec": W_dec.float().to(device), "W_enc": W_dec.float().T.contiguous().to(device),
             "b_enc": torch.zeros(W_dec.shape[0], device=device), "b_dec": torch.zeros(W_dec.shape[1], device=device)}
    if arch == "jumprelu":
        state["threshold"] = torch.full((W_dec.shape[0],), 0.1, device=device)
    sae.load_state_dict(state, assign=True)
    sae.cfg.device = str(device)
    return sae


@dataclass
class PlantedTruth:
    """What :func:`planted_chain_bank` planted (feature names as text)."""

    chain: list[str]                     # 0/res/3 -> 1/res/7 -> 2/res/1 -> 3/res/5
    chain_cosines: list[float]           # between consecutive chain features
    labels_layer2: dict[str, str] = field(default_factory=dict)  # with the paper's thresholds
    module_of_chain2: tuple[str, float] = ("2/mlp/0", 0.8)


def planted_chain_bank(d_model: int = 64, width: int = 12, *, cosines: tuple[float, ...] = (0.9, 0.6, 0.3),
                       decoder_scale: bool = True) -> tuple[SAEBank, PlantedTruth]:
    """A 4-layer bank with one residual chain and a known case of each label at layer 2.

    Built from an orthonormal basis E, so every cosine is exact: the chain feature of
    layer l+1 is ``a_l * c_l + sqrt(1 - a_l^2) * E[20 + l]``. At layer 2: slot 1 (the
    chain, s(R)=0.6, s(M)=0.8: processed), slot 0 copied from 2/mlp/1 (newborn), slot 9
    shared with res 1 and mostly att 2 (processed), slot 10 alone (unexplained); the
    other slots are shared with res 1 (2 and 3: translated) or private (unexplained). Decoder
    rows get non-unit norms (``decoder_scale``), which matching must ignore.
    """
    if d_model < 64 or width < 12:
        raise ValueError("planted_chain_bank needs d_model >= 64 and width >= 12")
    E = torch.linalg.qr(torch.randn(d_model, d_model, generator=torch.Generator().manual_seed(0)))[0].T
    chain = [E[0]]
    for layer, a in enumerate(cosines):
        chain.append(a * chain[-1] + math.sqrt(1 - a * a) * E[20 + layer])
    slots = [3, 7, 1, 5]
    rows: dict[tuple[Site, int], Tensor] = {}
    for layer, slot in enumerate(slots):
        start = 30 + 8 * layer if layer < 3 else 50   # consecutive layers share 4 filler directions
        rows[("res", layer)] = E[start:start + width].clone()
        rows[("res", layer)][slot] = chain[layer]
    rows[("res", 2)][0], rows[("res", 2)][9], rows[("res", 2)][10] = E[62], E[47], E[63]
    rows[("mlp", 2)] = torch.stack([E[21], E[62], E[5], E[6]])
    rows[("att", 2)] = torch.stack([E[8], 0.8 * E[47] + 0.6 * E[9], E[10]])
    archs = {"mlp": "jumprelu", "att": "topk"}
    saes = {key: sae_from_decoder(key[0], key[1], W * ((1 + key[1]) if decoder_scale else 1),
                                  arch=archs.get(key[0], "standard"))
            for key, W in rows.items()}
    truth = PlantedTruth(
        chain=[f"{layer}/res/{slot}" for layer, slot in enumerate(slots)],
        chain_cosines=list(cosines),
        labels_layer2={"2/res/0": "newborn", "2/res/1": "processed", "2/res/9": "processed",
                       "2/res/10": "unexplained", "2/res/2": "translated"},
    )
    return SAEBank(saes), truth


def random_bank(layers: range | list[int], sites: tuple[Site, ...] = ("res", "mlp", "att"), *, d_sae: int = 512,
                d_model: int = 64, device: torch.device | str = "cpu", seed: int = 0, arch: str = "standard") -> SAEBank:
    """Independent random unit decoders at every ``(site, layer)`` (no planted alignment); ``arch`` as in
    :func:`sae_from_decoder` (``"jumprelu"``: thresholds of 0.1, so ``scale="threshold"`` steering works)."""
    saes = {}
    for i, (layer, site) in enumerate((layer, site) for layer in layers for site in sites):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        W = torch.empty(d_sae, d_model)
        W.normal_(generator=gen)
        W.div_(W.norm(dim=1, keepdim=True))
        saes[(site, layer)] = sae_from_decoder(site, layer, W.to(device), arch=arch, device=device)
    return SAEBank(saes)


def tiny_model(*, n_layers: int = 4, d_model: int = 64, d_vocab: int = 100, seed: int = 0, gated: bool = False,
               device: torch.device | str = "cpu") -> Any:
    """A small random :class:`~tl_featureflow.model.FlowTransformer` without a tokenizer (token ids in,
    ``0..d_vocab-1``): the model of runnable examples; its shapes fit :func:`planted_chain_bank`.

    ``gated=True`` gives SmolLM2's (Llama's) layout: RMS norms, a gated SiLU MLP and
    grouped-query attention with half as many key/value heads.
    """
    import warnings

    from transformer_lens import HookedTransformerConfig

    from tl_featureflow.checks import check_device
    from tl_featureflow.model import FlowTransformer

    device = check_device(device)
    n_heads = d_model // 16
    extra: dict[str, Any] = (dict(gated_mlp=True, act_fn="silu", normalization_type="RMS",
                                  n_key_value_heads=max(1, n_heads // 2)) if gated
                             else dict(act_fn="gelu", normalization_type="LN"))
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_ctx=64, d_head=16, n_heads=n_heads,
                                  d_mlp=2 * d_model, d_vocab=d_vocab, positional_embedding_type="rotary", seed=seed,
                                  device=str(device), **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return FlowTransformer(cfg).eval()

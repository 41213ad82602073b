"""Synthetic SAE banks whose structure is known exactly, and a tiny model: for tests, docs, benchmarks.

Also the test suite's builders: :func:`tiny_cfg` (a 3-layer, d_model 32 config), :func:`make_sae`
and :func:`make_bank` (seeded SAEs of every SAELens architecture, every parameter random) and
:func:`byte_tokenizer`.

>>> bank, truth = planted_chain_bank()
>>> truth.chain       # the residual chain, layer 0 to 3
['0/res/3', '1/res/7', '2/res/1', '3/res/5']
>>> model = tiny_model()          # 4 layers, d_model 64: fits the planted bank
>>> model.cfg.n_layers, model.cfg.d_model
(4, 64)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor

from tl_featureflow.refs import SITES, Site, hook_name
from tl_featureflow.saes.bank import SAEBank

if TYPE_CHECKING:
    from transformer_lens import HookedTransformerConfig
    from transformers import PreTrainedTokenizerBase

    from tl_featureflow.model import FlowTransformer

__all__ = ["sae_from_decoder", "planted_chain_bank", "random_bank", "PlantedTruth", "tiny_model",
           "tiny_cfg", "make_sae", "make_bank", "byte_tokenizer", "ARCHITECTURES", "D_MODEL", "N_LAYERS", "D_VOCAB"]

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
               device: torch.device | str = "cpu") -> FlowTransformer:
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


# ---------------------------------------------------------------------------- the test suite's builders
#: The shape of :func:`tiny_cfg` (and the default ``d_in`` of :func:`make_sae`).
D_MODEL, N_LAYERS, D_VOCAB = 32, 3, 64

_SEEDED_ARCHS: dict[str, tuple[type[SAE], type]] = {
    "standard": (StandardSAE, StandardSAEConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
    "topk": (TopKSAE, TopKSAEConfig),
    "gated": (GatedSAE, GatedSAEConfig),
}
#: The SAELens architectures :func:`make_sae` builds.
ARCHITECTURES: tuple[str, ...] = tuple(_SEEDED_ARCHS)


def tiny_cfg(**overrides: Any) -> HookedTransformerConfig:
    """A 3-layer, d_model 32, vocabulary 64 rotary transformer's config on the CPU (rotary: see the
    setup notes on KV caches); ``overrides`` replace any field."""
    from transformer_lens import HookedTransformerConfig

    kwargs: dict[str, Any] = dict(
        n_layers=N_LAYERS, d_model=D_MODEL, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
        d_vocab=D_VOCAB, act_fn="gelu", normalization_type="LN",
        positional_embedding_type="rotary", seed=0, device="cpu",
    )
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


def make_sae(
    site: Site = "res",
    layer: int = 0,
    *,
    arch: str = "standard",
    d_in: int = D_MODEL,
    d_sae: int = 48,
    seed: int = 0,
    hook: str | None = "auto",
    dtype: str = "float32",
) -> SAE:
    """A seeded SAE with random (non-trivial) weights, built from a SAELens config of ``arch`` (one of
    :data:`ARCHITECTURES`); ``hook="auto"`` reads the hook of ``(site, layer)``, ``None`` no hook name."""
    cls, cfg_cls = _SEEDED_ARCHS[arch]
    extra = {"k": 8} if arch == "topk" else {}
    name = hook_name(site, layer) if hook == "auto" else hook
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, dtype=dtype, device="cpu",
                  metadata=SAEMetadata(hook_name=name), **extra)
    sae = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in sae.named_parameters():
            values = torch.randn(param.shape, generator=gen) * (0.3 if pname.startswith("b_") else 1.0)
            if pname == "threshold":
                values = values.abs() * 0.1
            param.copy_(values.to(param.dtype))
    return sae


def make_bank(
    sites: Sequence[Site] = SITES, layers: Iterable[int] = range(N_LAYERS), *, arch: str = "standard",
    d_sae: int = 48, seed: int = 0, **kw: Any,
) -> SAEBank:
    """A bank of :func:`make_sae` SAEs at every ``(site, layer)``, seeds ``seed, seed + 1, ...``; ``kw``
    go to :func:`make_sae` (``d_in``, ``hook``, ``dtype``)."""
    saes = {}
    for i, (site, layer) in enumerate((s, layer) for layer in layers for s in sites):
        saes[(site, layer)] = make_sae(site, layer, arch=arch, d_sae=d_sae, seed=seed + i, **kw)
    return SAEBank(saes)


def byte_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 bytes + bos/eos/pad), saved to ``folder`` and reloaded from it
    (TransformerLens reloads tokenizers by ``name_or_path``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|bos|>", "<|eos|>", "<|pad|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                            pad_token="<|pad|>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)

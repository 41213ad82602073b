"""Shared fixtures: tiny seeded models and SAEs, and the no-hooks-left-behind guard."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch
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
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from tl_featureflow.refs import SITES, hook_name
from tl_featureflow.saes.bank import SAEBank

# ---------------------------------------------------------------------------- hook guard
_HOOKED: weakref.WeakSet[HookPoint] = weakref.WeakSet()
_original_add_hook = HookPoint.add_hook


def _recording_add_hook(self: HookPoint, *args, **kwargs):  # type: ignore[no-untyped-def]
    _HOOKED.add(self)
    return _original_add_hook(self, *args, **kwargs)


HookPoint.add_hook = _recording_add_hook  # type: ignore[method-assign]


def leftover_hooks() -> list[str]:
    """Hook points that still hold non-permanent hooks added since the last reset."""
    left = []
    for point in list(_HOOKED):
        n = sum(not h.is_permanent for h in [*point.fwd_hooks, *point.bwd_hooks])
        if n:
            left.append(f"{point.name if point.name else repr(point)}: {n} hook(s)")
    return left


@pytest.fixture(autouse=True)
def no_hooks_left_behind():
    """Fail any test that leaves a (non-permanent) hook on a model."""
    _HOOKED.clear()
    yield
    left = leftover_hooks()
    for point in list(_HOOKED):
        point.remove_hooks("both")
    _HOOKED.clear()
    if left:
        pytest.fail(f"hooks left on a model after the test: {left}")


# ---------------------------------------------------------------------------- tiny models
D_MODEL = 32
N_LAYERS = 3
D_VOCAB = 64


def tiny_cfg(**overrides) -> HookedTransformerConfig:
    """A 3-layer, d_model 32 rotary transformer (rotary: see setup notes on KV caches)."""
    kwargs = dict(
        n_layers=N_LAYERS, d_model=D_MODEL, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
        d_vocab=D_VOCAB, act_fn="gelu", normalization_type="LN",
        positional_embedding_type="rotary", seed=0, device="cpu",
    )
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


@pytest.fixture
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    return HookedTransformer(tiny_cfg()).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- tiny SAEs
_ARCH: dict[str, tuple[type[SAE], type]] = {
    "standard": (StandardSAE, StandardSAEConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
    "topk": (TopKSAE, TopKSAEConfig),
    "gated": (GatedSAE, GatedSAEConfig),
}
ARCHITECTURES = tuple(_ARCH)


def make_sae(
    site: str = "res",
    layer: int = 0,
    *,
    arch: str = "standard",
    d_in: int = D_MODEL,
    d_sae: int = 48,
    seed: int = 0,
    hook: str | None = "auto",
    dtype: str = "float32",
) -> SAE:
    """A seeded SAE with random (non-trivial) weights, built from a SAELens config."""
    cls, cfg_cls = _ARCH[arch]
    extra = {"k": 8} if arch == "topk" else {}
    name = hook_name(site, layer) if hook == "auto" else hook  # type: ignore[arg-type]
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
    sites=SITES, layers=range(N_LAYERS), *, arch: str = "standard", d_sae: int = 48, seed: int = 0, **kw
) -> SAEBank:
    saes = {}
    for i, (site, layer) in enumerate((s, layer) for layer in layers for s in sites):
        saes[(site, layer)] = make_sae(site, layer, arch=arch, d_sae=d_sae, seed=seed + i, **kw)
    return SAEBank(saes)


@pytest.fixture
def sae_factory() -> Callable[..., SAE]:
    return make_sae


@pytest.fixture
def bank_factory() -> Callable[..., SAEBank]:
    return make_bank


# ---------------------------------------------------------------------------- a tiny model that reads text
def byte_tokenizer(folder):
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


@pytest.fixture(scope="session")
def text_model_factory(tmp_path_factory):
    """``factory()`` -> a fresh tiny FlowTransformer with a byte tokenizer (3 layers, d_model 32)."""
    from tl_featureflow.model import FlowTransformer

    tokenizer = byte_tokenizer(tmp_path_factory.mktemp("byte-tokenizer"))

    def factory():
        torch.manual_seed(0)
        return FlowTransformer(tiny_cfg(d_vocab=len(tokenizer), n_ctx=256), tokenizer=tokenizer).eval()

    return factory


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path, text_model_factory):
    """The CLI on tiny assets: a byte-level tiny model, a random JumpReLU bank (``--bank`` args returned)."""
    from tl_featureflow import cli

    model = text_model_factory()
    bank_dir = make_bank(arch="jumprelu", d_sae=64).save(tmp_path / "bank")
    texts = torch.cat([torch.full((3, 1), model.tokenizer.bos_token_id),
                       torch.randint(0, 256, (3, 23), generator=torch.Generator().manual_seed(0))], dim=1)
    monkeypatch.setattr(cli, "_load_model", lambda args: model)
    monkeypatch.setattr(cli, "_heldout_tokens", lambda model, n: texts[:n])
    monkeypatch.chdir(tmp_path)
    return ["--bank", str(bank_dir)]


def run_cli(argv, capsys):
    """Run `featureflow ARGV` in-process: (exit code, stdout, stderr)."""
    from tl_featureflow import cli

    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err

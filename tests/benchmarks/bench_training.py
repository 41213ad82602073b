"""Benchmark: our sparse BatchTopK training step against SAELens's and the dense-matmul floor (issue 12).

    .venv/bin/python tests/benchmarks/bench_training.py [--d-in 576] [--expansion 3] [--k 32] [--batch 256]
                                                        [--steps 200] [--threads 1] [--device cpu]
    .venv/bin/python tests/benchmarks/bench_training.py --preset-rate full [--rate-tokens 131072] [--weights random]

At the quick preset's shapes (SmolLM2's d_model 576, d_sae 1,728, k 32, 256 tokens a step),
in one run, on the same random activations:

1. SAELens's ``MultiSAETrainer`` driving one ``BatchTopKTrainingSAE`` (``train_bank(trainer="saelens")``),
   time per step and per SAE-token;
2. the same trainer with our step (``train_bank(trainer="fast")``, the default:
   :mod:`tl_featureflow.saes.fast_step`, same loss and gradients), same data and seed;
3. the floor: the five dense matmuls of a step (encode, decode, and the three of the backward
   pass: ``dW_dec = a^T g``, ``da = g W_dec^T``, ``dW_enc = x^T g_pre``), timed alone;
4. where each step's time goes: torch profiler, top operators by self time.

Ratios: (1) / (2) is our speed-up per SAE-token (goal >= 2); (2) / (3) compares our step
with the dense floor (below 1.0: sparse decoding goes under it, 98% of the activations
are zero at k 32 of 1,728).
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import timed  # noqa: I001 - puts the project on sys.path first

from tl_featureflow import _compat  # noqa: E402
from tl_featureflow.saes import fast_step  # noqa: E402


def saelens_steps(d_in: int, d_sae: int, k: int, batch: int, steps: int, device: str, fast: bool = False) -> float:
    """Seconds per step of SAELens's trainer (after 10 warm-up steps), with our step if ``fast``."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device,
                                                          normalize_activations="expected_average_only_in"))
    total = (steps + 10) * batch
    cfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=batch, lr=3e-3, lr_end=3e-4,
                           device=device, dead_feature_window=1000, feature_sampling_window=1000, n_checkpoints=0,
                           checkpoint_path="/tmp/ff-bench-ckpt", n_batches_for_norm_estimate=2)
    data = torch.randn(steps + 12, batch, d_in, generator=torch.Generator().manual_seed(1)).to(device)
    stamps: list[float] = []

    def provider():  # type: ignore[no-untyped-def]
        for i in range(steps + 10):
            _sync(device)
            stamps.append(time.perf_counter())
            yield {"h": data[i]}

    multi = _compat.multi_sae_trainer_class()(cfg=cfg, saes={"s": sae}, hook_names={"s": "h"},
                                              data_provider=provider(), save_checkpoint_fn=lambda p: None)
    for trainer in multi.trainers.values():
        _compat.estimate_scaling_factor(trainer, d_in, iter([data[-1], data[-2]]), 2)
        if fast:
            assert fast_step.use_fast_step(trainer) is None
    with _compat.quiet_sae_lens_bars():
        multi.fit()
    return (stamps[-1] - stamps[10]) / (len(stamps) - 11)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def preset_rate(args: argparse.Namespace) -> None:
    """Tokens per second of ``train_bank`` with a whole preset (every SAE it trains), on random rows.

    The model forward and every SAE's step are in the rate (``train_seconds_last_session``: the
    training loop alone, without calibration and saving); checkpoints are off.
    """
    import tempfile
    from dataclasses import replace

    import _models

    from tl_featureflow.saes.presets import PRESETS
    from tl_featureflow.saes.training import train_bank

    model, _ = _models.load_models(args)
    preset = replace(PRESETS[args.preset_rate], training_tokens=args.rate_tokens, n_checkpoints=0)
    n_rows = max(2 * args.rate_tokens // preset.context_size, 64)
    tokens = torch.randint(1, model.cfg.d_vocab, (n_rows, preset.context_size), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        wall, bank = timed(lambda: train_bank(model, preset=preset, tokens=tokens, out=f"{tmp}/run", progress=False))
    loop = bank.metadata["train_seconds_last_session"]
    print(f"device {args.device}, weights {args.weights}, preset {preset.describe()}: {len(bank)} SAEs")
    print(f"| train_bank({args.preset_rate!r}) training loop | {loop:.1f} s | {args.rate_tokens / loop:,.0f} tokens/s | "
          f"{len(bank) * args.rate_tokens / loop:,.0f} SAE-tokens/s |")
    print(f"| the same, calibration and saving included | {wall:.1f} s | {args.rate_tokens / wall:,.0f} tokens/s | |")
    print(f"| the preset's whole budget at that rate | {preset_budget(args.preset_rate) / (args.rate_tokens / loop) / 60:.1f}"
          f" min | {preset_budget(args.preset_rate):,} tokens | |")


def preset_budget(name: str) -> int:
    from tl_featureflow.saes.presets import PRESETS

    return PRESETS[name].training_tokens


def dense_floor(d_in: int, d_sae: int, batch: int, steps: int, device: str) -> float:
    """Seconds for the five dense matmuls of one step (median of ``steps``)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, d_in, generator=gen).to(device)
    W_enc = torch.randn(d_in, d_sae, generator=gen).to(device)
    W_dec = torch.randn(d_sae, d_in, generator=gen).to(device)
    a = torch.randn(batch, d_sae, generator=gen).to(device)
    g = torch.randn(batch, d_in, generator=gen).to(device)
    times = []
    for _ in range(steps):
        seconds, _ = timed(lambda: (x @ W_enc, a @ W_dec, a.T @ g, g @ W_dec.T, x.T @ a, _sync(device)))
        times.append(seconds)
    times.sort()
    return times[len(times) // 2]


def profile(d_in: int, d_sae: int, k: int, batch: int, device: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for fast in (False, True):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            saelens_steps(d_in, d_sae, k, batch, 40, device, fast=fast)
        print(f"\n{'our step' if fast else 'SAELens step'}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansion", type=int, default=3)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--preset-rate", metavar="PRESET", help="instead: train_bank's rate with a whole preset "
                        "(e.g. full) on --rate-tokens random tokens, model from --weights")
    parser.add_argument("--rate-tokens", type=int, default=131_072)
    parser.add_argument("--weights", choices=["embedded", "random"], default="embedded")
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.preset_rate:
        preset_rate(args)
        return
    d_sae = args.d_in * args.expansion
    step = saelens_steps(args.d_in, d_sae, args.k, args.batch, args.steps, args.device)
    ours = saelens_steps(args.d_in, d_sae, args.k, args.batch, args.steps, args.device, fast=True)
    floor = dense_floor(args.d_in, d_sae, args.batch, args.steps, args.device)
    print(f"device {args.device}, {torch.get_num_threads()} thread(s), d_in {args.d_in}, d_sae {d_sae}, k {args.k}, "
          f"batch {args.batch} tokens, {args.steps} steps")
    print(f"| SAELens BatchTopK step (MultiSAETrainer, one SAE) | {1e3 * step:.1f} ms | "
          f"{args.batch / step:,.0f} SAE-tokens/s |")
    print(f"| dense floor: the five matmuls of a step | {1e3 * floor:.1f} ms | {args.batch / floor:,.0f} SAE-tokens/s |")
    print(f"| our step (same trainer, sparse BatchTopK maths) | {1e3 * ours:.1f} ms | "
          f"{args.batch / ours:,.0f} SAE-tokens/s |")
    print(f"| ratio SAELens / floor | {step / floor:.2f} | |")
    print(f"| ratio SAELens / ours (speed-up) | {step / ours:.2f} | |")
    print(f"| ratio ours / floor | {ours / floor:.2f} | |")
    if not args.no_profile:
        profile(args.d_in, d_sae, args.k, args.batch, args.device)


if __name__ == "__main__":
    main()

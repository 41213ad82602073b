"""The ``featureflow`` command. Imports stay lazy so ``--help`` answers at once."""

from __future__ import annotations

import argparse
import sys
import time

DEMO_PROMPT = "The Eiffel Tower is located in the city of"


def _demo(args: argparse.Namespace) -> int:
    print(f"loading the embedded model (SmolLM2-135M-Instruct) on {args.device}...", flush=True)
    start = time.perf_counter()
    from tl_featureflow.embedded import load_embedded_model

    model = load_embedded_model(device=args.device)
    print(f"loaded in {time.perf_counter() - start:.1f} s: {model.cfg.n_layers} layers, "
          f"d_model {model.cfg.d_model}", flush=True)
    start = time.perf_counter()
    text = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False,
                          verbose=False, use_past_kv_cache=True)
    print(f"greedy completion ({time.perf_counter() - start:.1f} s):\n  {text}")
    return 0


def _train_saes(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from tl_featureflow.embedded import load_embedded_bank, load_embedded_model
    from tl_featureflow.quality import QualityReport
    from tl_featureflow.training import train_bank

    trained_here = True  # train_bank prints its quality table itself
    if args.out is None and args.layers is None and args.sites is None and args.tokens is None:
        from tl_featureflow.embedded import embedded_bank_dir

        trained_here = not (embedded_bank_dir(args.preset) / "bank" / "bank.json").is_file()
        bank = load_embedded_bank(args.preset, device=args.device)
    else:
        model = load_embedded_model(device=args.device)
        out = args.out or f"featureflow-out/bank-{args.preset}"
        bank = train_bank(model, preset=args.preset, out=out, layers=args.layers,
                          sites=args.sites or ("res", "mlp", "att"), training_tokens=args.tokens)
        print(f"bank saved to {out}/bank")
    if bank.metadata.get("quality") and not trained_here:
        print(QualityReport.from_dict(bank.metadata["quality"]).table())
    print(f"{bank!r} ready in {time.perf_counter() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featureflow",
        description="Trace, validate and steer SAE features across the layers of a TransformerLens model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the demo on the embedded SmolLM2 model (offline)",
        description="Load the embedded SmolLM2-135M-Instruct (converted and cached on first use) "
        "and run the demo.",
        epilog="example: featureflow demo --max-new-tokens 8",
    )
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="prompt to complete")
    demo.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default: 8)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser(
        "train-saes",
        help="train an SAE bank for the embedded model with SAELens",
        description="Train one SAE per (site, layer) on the offline corpus. Without --out/--layers/--sites/--tokens "
        "this builds (or reuses) the embedded model's default bank in the cache, which the other commands use.",
        epilog="examples:\n  featureflow train-saes --preset quick\n"
        "  featureflow train-saes --preset full\n"
        "  featureflow train-saes --preset quick --layers 10 11 12 --sites res mlp --out my-bank\n"
        "An interrupted run resumes from its last checkpoint when run again with the same arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--preset", default="quick", choices=["quick", "full", "tiny"],
                       help="quick: 6 middle layers, ~15 min on 2 CPU cores; full: every layer (hours); tiny: seconds")
    train.add_argument("--layers", type=int, nargs="+", help="layers to train (default: the preset's)")
    train.add_argument("--sites", nargs="+", choices=["res", "mlp", "att"], help="sites (default: all three)")
    train.add_argument("--tokens", type=int, help="training tokens (default: the preset's)")
    train.add_argument("--out", help="run folder (default: the embedded model's bank in the cache)")
    train.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    train.set_defaults(func=_train_saes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from tl_featureflow.errors import FeatureFlowError

    try:
        return int(args.func(args))
    except FeatureFlowError as exc:
        print(f"featureflow: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

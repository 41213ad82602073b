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

"""Benchmark: FlowTransformer.generate (fast path) vs TransformerLens's path vs Hugging Face, same weights.

    .venv/bin/python tests/benchmarks/bench_generate.py [--tokens 32] [--repeats 3] [--device cpu] [--weights random]

On the embedded SmolLM2-135M-Instruct, in one run, runs interleaved, median of ``--repeats``:

1. Time per new token of greedy ``generate`` with the KV cache, batch 1 and batch 16: the
   FlowTransformer on its fast path (``"exact"``, the embedded model's default, and
   ``"views"``), the same weights with ``fast_path=False``
   (TransformerLens 3.9's own forward), and Hugging Face's ``LlamaForCausalLM.generate``
   on the same dequantised weights (goal: fast path <= 1.5x HF's time). The tokens are
   compared (greedy: fast path and TransformerLens's path must agree).
2. The fast path with a Steerer adding 10 features (a flow graph's, topped up with other
   features of the seed's layer when the graph is smaller) against unsteered (goal:
   overhead <= 5%).
3. A steering sweep as the demo runs it (``steering_sweep``, 2 layers x 2 strengths x
   2 modes x 2 samples + baseline, 36 tokens, batched) with the fast path on and off.
"""

from __future__ import annotations

import argparse
import statistics

import _models  # noqa: E402
import torch
from _timing import timed  # noqa: I001 - puts the project on sys.path first

import tl_featureflow as ff  # noqa: E402
from tl_featureflow.steer.sweeps import SweepSettings, steering_sweep  # noqa: E402


def whole_calls(paths: dict, hf: object, prompt: torch.Tensor, eos: int, repeats: int, n: int = 24) -> None:
    """Whole ``generate`` calls, batch 1, ``n`` new tokens, prompt included (what a user waits for), beside the
    time per token after the prompt, ``(T(n) - T(1)) / (n - 1)``, both against Hugging Face in the same run."""
    def ours(on, k):  # type: ignore[no-untyped-def]
        return paths[on].generate(prompt, max_new_tokens=k, do_sample=False, stop_at_eos=False, verbose=False)

    def theirs(k):  # type: ignore[no-untyped-def]
        return hf.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=eos)

    runs = {f"{name}, {k}": (lambda name=name, k=k: (ours(name, k) if name != "Hugging Face" else theirs(k)))
            for name in ("exact", "views", "Hugging Face") for k in (1, n)}
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn)[0])
    med = {name: statistics.median(values) for name, values in times.items()}
    hf_whole, hf_step = med[f"Hugging Face, {n}"], (med[f"Hugging Face, {n}"] - med["Hugging Face, 1"]) / (n - 1)
    print(f"whole calls, batch 1, {n} new tokens, prompt included (median of {repeats}):")
    for name in ("exact", "views", "Hugging Face"):
        whole, step = med[f"{name}, {n}"], (med[f"{name}, {n}"] - med[f"{name}, 1"]) / (n - 1)
        print(f"  {name:<14} whole {whole * 1000:7.1f} ms  {whole / hf_whole:5.2f}x HF   "
              f"per token after the prompt {step * 1000:6.1f} ms  {step / hf_step:5.2f}x HF   "
              f"prompt + first token {med[f'{name}, 1'] * 1000:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="quick", help="bank for the steering parts (default: quick)")
    _models.add_arguments(parser)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, hf = _models.load_models(args, hf=True)
    eos = model.tokenizer.eos_token_id
    n = args.tokens
    print(f"device {args.device}, weights {args.weights}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {n} new tokens, median of {args.repeats}; fast path: {model.fast_path}")

    # one model per path, all sharing the same parameter tensors (switching modes would drop the exact copies)
    paths = {"exact": model, "views": ff.FlowTransformer.from_hooked(model, fast_path="views"),
             False: ff.FlowTransformer.from_hooked(model, fast_path=False)}
    for batch in (1, 16):
        prompt = model.to_tokens(["The Eiffel Tower is located in the city of"] * batch)

        def ours(on, prompt=prompt):  # type: ignore[no-untyped-def]
            return paths[on].generate(prompt, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False)

        def theirs(prompt=prompt):  # type: ignore[no-untyped-def]
            return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos)

        runs = {"fast path (exact)": lambda: ours("exact"), "fast path (views)": lambda: ours("views"),
                "TransformerLens path": lambda: ours(False), "Hugging Face": theirs}
        for fn in runs.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runs}
        outs = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                seconds, outs[name] = timed(fn)
                times[name].append(seconds)
        hf_ms = statistics.median(times["Hugging Face"]) / n * 1000
        print(f"batch {batch}:")
        for name, values in times.items():
            ms = statistics.median(values) / n * 1000
            print(f"  {name:<22} {ms:7.1f} ms/token   {ms / hf_ms:5.2f}x Hugging Face")
        same = all(torch.equal(outs[k], outs["TransformerLens path"]) for k in ("fast path (exact)", "fast path (views)"))
        same_hf = torch.equal(outs["fast path (exact)"].cpu(), outs["Hugging Face"].cpu())
        print(f"  greedy tokens: both fast paths == TransformerLens path: {same}; == Hugging Face: {same_hf}")

    whole_calls(paths, hf, model.to_tokens("The Eiffel Tower is located in the city of"), eos, args.repeats)

    bank = _models.load_bank(args, model, args.preset)
    seed = next(iter(bank.layers[len(bank.layers) // 2:]))
    tracer = _models.tracer(args, model, bank)
    graph = max((tracer.trace(f"{seed}/res/{i}") for i in range(0, 200, 7)), key=lambda g: len(g.nodes))
    refs = sorted(n_.ref for n_ in graph.nodes)[:10]
    extra = (ff.FeatureRef(graph.seed.layer, "res", i) for i in range(bank.d_sae("res", graph.seed.layer)))
    refs += [ref for ref in extra if ref not in refs][:10 - len(refs)]   # 10 features even from a small graph
    prompt = model.to_tokens("I think")
    kwargs = dict(max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False)

    def plain():  # type: ignore[no-untyped-def]
        return model.generate(prompt, **kwargs)

    def steered():  # type: ignore[no-untyped-def]
        steerer = ff.Steerer(model, bank, scale="threshold")
        for ref in refs:
            steerer.add(ref, 4.0)
        with steerer:
            return model.generate(prompt, **kwargs)

    plain()
    times = {"unsteered": [], f"Steerer, {len(refs)} features": []}
    for _ in range(args.repeats):
        for name, fn in zip(times, (plain, steered), strict=True):
            times[name].append(timed(fn)[0])
    base = statistics.median(times["unsteered"])
    print(f"fast path (exact), batch 1, {n} new tokens:")
    for name, values in times.items():
        print(f"  {name:<22} {statistics.median(values) / n * 1000:7.1f} ms/token   "
              f"overhead {100 * (statistics.median(values) / base - 1):+5.1f}%")

    settings = SweepSettings(prompt="I think", strengths=(8.0, 16.0), layers=(graph.seed.layer, graph.span[1]),
                             samples=2, scale="threshold", batch_size=32)
    sweep_times = {}
    for on in ("exact", False):
        sweep_times[on], sweep = timed(lambda on=on: steering_sweep(paths[on], bank, graph, settings, progress=False))
    print(f"steering sweep ({len(sweep.rows)} rows, {sweep.meta['generate_calls']} generate call(s), 36 tokens): "
          f"fast path (exact) {sweep_times['exact']:.1f} s, TransformerLens path {sweep_times[False]:.1f} s -> "
          f"{sweep_times[False] / sweep_times['exact']:.1f}x")


if __name__ == "__main__":
    main()

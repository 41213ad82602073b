"""The ``featureflow`` command. Imports stay lazy so ``--help`` answers at once.

Every subcommand works on the embedded SmolLM2 (offline) with its SAE bank: the
best bank already in the cache by default (the ``quick`` preset, trained on first use, when
there is none), another preset with ``--preset``, or any saved :class:`~tl_featureflow.saes.bank.SAEBank` folder
with ``--bank``. Results go under ``featureflow-out/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Vocabulary from its homes (light modules: no torch, no SAELens), never retyped here.
from tl_featureflow.flow.methods import METHODS, data_free_names
from tl_featureflow.refs import LABELS, SITES
from tl_featureflow.saes.presets import PRESETS, preset_cost

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_featureflow.model import FlowTransformer
    from tl_featureflow.saes.bank import SAEBank

VALIDATE_OUT = "featureflow-out/validation.json"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- loading (tests replace these two) -------------------------------------------------------------
def _load_model(args: argparse.Namespace) -> FlowTransformer:
    from tl_featureflow.embedded import load_embedded_model

    return load_embedded_model(device=args.device)


def _load_bank(args: argparse.Namespace, model: HookedTransformer) -> SAEBank:
    if getattr(args, "bank", None):
        from tl_featureflow.saes.bank import SAEBank

        bank = SAEBank.load(args.bank, device=args.device, lazy=getattr(args, "lazy", False))
        if hasattr(model, "check_bank"):
            model.check_bank(bank)
        return bank
    from tl_featureflow.embedded import FLOW_PRESETS, best_cached_preset, embedded_bank_dir, load_embedded_bank
    from tl_featureflow.errors import CacheError, InvalidArgumentError

    if getattr(args, "lazy", False):
        raise InvalidArgumentError("--lazy opens a saved bank folder lazily: give it with --bank DIR")

    preset = args.preset
    if preset is None:   # the best bank already in the cache (the quick one when there is none)
        preset = best_cached_preset(("full", "paper", *FLOW_PRESETS[1:]) if getattr(args, "paper", False) else FLOW_PRESETS)
    if not getattr(args, "train", False) and not (embedded_bank_dir(preset) / "bank" / "bank.json").is_file():
        raise CacheError(f"the {preset!r} bank of the embedded model is not trained yet ({preset_cost(preset)} here): "
                         f"train it once with `featureflow train-saes --preset {preset}`, or add --train to this "
                         "command; `featureflow demo` trains the quick bank")
    return load_embedded_bank(preset, model=model, device=args.device)


def _heldout_tokens(model: HookedTransformer, n: int) -> Any:
    from tl_featureflow.saes.corpus import load_corpus

    return load_corpus(model.tokenizer, "heldout", progress=True).tokens[:n]


def _context_tokens(model: HookedTransformer) -> Any:
    """The held-out rows features are labelled by (their top contexts)."""
    from tl_featureflow.flow.contexts import DEFAULT_CONTEXT_ROWS

    return _heldout_tokens(model, DEFAULT_CONTEXT_ROWS)


def _setup(args: argparse.Namespace, *, verbose: bool = True) -> tuple[FlowTransformer, SAEBank]:
    start = time.perf_counter()
    model = _load_model(args)
    bank = _load_bank(args, model)
    if verbose:
        print(f"model {model.cfg.model_name} ({model.cfg.n_layers} layers) and bank {bank.describe()} ready in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return model, bank


@contextmanager
def _ranks(args: argparse.Namespace) -> Iterator[Any]:
    """This process's :class:`~tl_featureflow.distributed.Ranks`: with ``--distributed``, the process group
    torchrun's environment describes (joined here, left on the way out; ``args.device`` becomes this
    rank's device), else one process alone."""
    from tl_featureflow import distributed

    if not getattr(args, "distributed", False):
        yield distributed.single(args.device)
        return
    ranks = distributed.init(args.device, timeout_s=args.dist_timeout)
    args.device = str(ranks.device)
    try:
        yield ranks
    finally:
        distributed.shutdown(ranks)


def _setup_ranks(args: argparse.Namespace, ranks: Any) -> tuple[FlowTransformer, SAEBank]:
    """:func:`_setup` on every rank (rank 0 says so); a rank that cannot load them ends every rank."""
    from tl_featureflow.distributed import all_ok

    return all_ok(ranks, lambda: _setup(args, verbose=ranks.is_root), "loading the model and the bank")


# -- subcommands -------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from tl_featureflow.demo import run_demo

    model, bank = _setup(args)
    texts = _heldout_tokens(model, args.texts)
    path = run_demo(model, bank, args.out, themes=args.themes, texts=texts, samples=args.samples,
                    max_new_tokens=args.max_new_tokens, context_tokens=_context_tokens(model))
    print(f"\nDone. Open the report in a browser: {path.resolve()}")
    return 0


def _train_saes(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from tl_featureflow.embedded import load_embedded_bank
    from tl_featureflow.saes.quality import QualityReport
    from tl_featureflow.saes.training import train_bank

    trained_here = True  # train_bank prints its quality table itself
    if args.out is None and args.layers is None and args.sites is None and args.tokens is None \
            and args.trainer == "fast":
        from tl_featureflow.embedded import embedded_bank_dir

        trained_here = not (embedded_bank_dir(args.preset) / "bank" / "bank.json").is_file()
        bank = load_embedded_bank(args.preset, device=args.device)
    else:
        model = _load_model(args)
        out = args.out or f"featureflow-out/bank-{args.preset}"
        bank = train_bank(model, preset=args.preset, out=out, layers=args.layers,
                          sites=args.sites or SITES, training_tokens=args.tokens, trainer=args.trainer)
        print(f"bank saved to {out}/bank")
    report = QualityReport.of_bank(bank)
    if report is not None and not trained_here:
        print(report.table())
    print(f"{bank!r} ready in {time.perf_counter() - start:.0f} s")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from tl_featureflow.flow.contexts import feature_contexts
    from tl_featureflow.flow.tracer import FlowTracer
    from tl_featureflow.viz import plot

    model, bank = _setup(args)
    tracer = FlowTracer(bank, model, contexts=feature_contexts(model, bank, _context_tokens(model)))
    graph = tracer.trace(args.feature, t_res=args.t_res, t_module=args.t_module, direction=args.direction,
                         method=args.method)
    out = Path(args.out or f"featureflow-out/graphs/{str(graph.seed).replace('/', '-')}.json")
    graph.save(out)
    print(f"flow graph of {graph.seed}: {len(graph.nodes)} features, {len(graph.edges)} edges, "
          f"layers {graph.span[0]}-{graph.span[1]}")
    for node in graph.nodes:
        scores = ", ".join(f"s({s.upper()})={v:.2f}" for s in SITES
                           if (v := getattr(node, f"s_{s}")) is not None)
        print(f"  {str(node.ref):>14}  {node.role:<6} {scores}")
        print(f"  {'':>14}  fires on: {node.label or '?'}")
        if node.lens and node.lens != node.label:
            print(f"  {'':>14}  logit lens: {node.lens}")
    print(f"saved {out}")
    if args.html:
        print(f"figure: {plot.write_html(plot.flow_graph(graph), args.html)}")
    return 0


def _map(args: argparse.Namespace) -> int:
    from tl_featureflow.flow import sharded
    from tl_featureflow.flow.tracer import FlowTracer

    with _ranks(args) as ranks:
        model, bank = _setup_ranks(args, ranks)
        tracer = FlowTracer(bank, model)
        fmap = (sharded.flow_map(tracer, args.out, ranks, layers=args.layers, k=args.k, method=args.method)
                if args.distributed else tracer.flow_map(args.out, layers=args.layers, k=args.k, method=args.method))
    if fmap is None:              # a rank other than 0: rank 0 wrote the map and reports it
        return 0
    print("layer | " + " | ".join(LABELS))
    for layer, counts in fmap.groups().items():
        print(f"{layer:>5} | " + " | ".join(f"{counts.get(g, 0):>10}" for g in LABELS))
    print(f"saved {args.out}")
    return 0


def _train_tokens(model: HookedTransformer, n_tokens: int) -> Any:
    """Training-split rows holding about ``n_tokens`` tokens (for Pearson correlations)."""
    from tl_featureflow.causal.pearson import training_rows

    return training_rows(model, n_tokens)


def _validate_paper(args: argparse.Namespace, model: HookedTransformer, bank: SAEBank, tokens: Any,
                    ranks: Any = None) -> int:
    from tl_featureflow._files import atomic_write_text
    from tl_featureflow.causal.protocol import run_paper_protocol, table1_markdown
    from tl_featureflow.flow.contexts import feature_contexts
    from tl_featureflow.rundir import RunDir
    from tl_featureflow.viz.html import report_from_dir

    out = RunDir(args.out if args.out != VALIDATE_OUT else "featureflow-out/table1")
    root = ranks is None or ranks.is_root
    contexts = feature_contexts(model, bank, _context_tokens(model), progress=root)   # cached: computed once
    alive = contexts.alive()
    report = run_paper_protocol(model, bank, tokens, layers=args.layers, alive=alive,
                                pearson_tokens=_train_tokens(model, args.pearson_tokens),
                                pearson_source="offline corpus, train split", progress=root, ranks=ranks)
    if report is None:            # a rank other than 0: rank 0 merged the report and writes the run folder
        return 0
    out.root.mkdir(parents=True, exist_ok=True)
    report.save(out.validation)
    command = "featureflow validate --paper " + " ".join(a for a in sys.argv[2:] if a != "--paper")
    text = "# Table 1, the paper's way\n\n" + table1_markdown(report, command=command.strip())
    atomic_write_text(out.table1, text)
    out.write_run({"title": "Table 1, the paper's way", "summary": [], "settings": {
        "command": command.strip(), "bank": bank.describe(), "texts": int(tokens.shape[0])}})
    print(text)
    print(f"saved {out.table1}, {out.validation} and {report_from_dir(out.root)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from tl_featureflow.causal import sharded
    from tl_featureflow.causal.experiment import validate
    from tl_featureflow.flow.tracer import FlowTracer
    from tl_featureflow.steer.seeds import seed_layer

    with _ranks(args) as ranks:
        model, bank = _setup_ranks(args, ranks)
        tokens = _heldout_tokens(model, args.texts)
        if args.paper:
            return _validate_paper(args, model, bank, tokens, ranks if args.distributed else None)
        layers = args.layers or [seed_layer(bank)]
        settings = dict(layers=layers, methods=args.methods, r=args.r, loss_samples=args.loss_samples, progress=True)
        tracer = FlowTracer(bank, model)
        report = (sharded.validate(tracer, model, tokens, ranks, **settings) if args.distributed
                  else validate(tracer, model, tokens, **settings))
    if report is None:            # a rank other than 0: rank 0 merged the report and saves it
        return 0
    report.save(args.out)
    print("method | success rate | activation change | n")
    for method, row in report.summary().items():
        print(f"{method} | {row['success_rate']:.1%} | {row['activation_change']:.3f} | {row['n']}")
    print(f"saved {args.out}")
    return 0


def _steer(args: argparse.Namespace) -> int:
    import torch

    from tl_featureflow.backend import backend_of
    from tl_featureflow.flow.tracer import FlowTracer
    from tl_featureflow.steer.steerer import Steerer
    from tl_featureflow.steer.sweeps import SweepSettings, format_seconds, generation_seconds

    model, bank = _setup(args)
    ref = bank.check_ref(args.feature)
    contexts = None
    if args.scale == "typical":
        from tl_featureflow.flow.contexts import feature_contexts

        contexts = feature_contexts(model, bank, _context_tokens(model))
    steerer = Steerer(model, bank, positions=args.positions, scale=args.scale, contexts=contexts)
    if args.mode == "feature":
        getattr(steerer, args.op)(ref, args.strength)
    else:
        graph = FlowTracer(bank, model, contexts=None).trace(ref, labels=False)
        steerer.along(graph, args.strength, mode=args.mode, op=args.op, up_to_layer=args.up_to_layer)
        print(f"steering {len(steerer.edits)} features of the flow graph of {ref} ({args.mode})")
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.samples > 0, top_p=0.7, temperature=1.27,
                  verbose=True)       # TransformerLens's own bar over the new tokens
    rows = max(args.samples, 1)
    prompts = [args.prompt] * rows
    backend = backend_of(model)
    cost = generation_seconds(model, backend.tokenize(args.prompt).shape[-1], rows,
                              SweepSettings(max_new_tokens=args.max_new_tokens, batch_size=rows))
    print(f"generating {rows} unsteered and {rows} steered continuations of {args.max_new_tokens} tokens, "
          f"about {format_seconds(2 * cost)}", flush=True)
    torch.manual_seed(args.seed)
    baseline = backend.generate(prompts, **kwargs)
    torch.manual_seed(args.seed)
    with steerer:
        steered = backend.generate(prompts, **kwargs)
    baseline = [baseline] if isinstance(baseline, str) else baseline
    steered = [steered] if isinstance(steered, str) else steered
    for i, (a, b) in enumerate(zip(baseline, steered, strict=False)):
        print(f"\n[{i}] unsteered: {a!r}\n[{i}] steered ({args.op} {args.strength:g}): {b!r}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tl_featureflow.viz.html import report_from_dir

    path = report_from_dir(args.run_dir, args.out)
    print(f"report: {path.resolve()}")
    return 0


# -- parser ------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, *, bank: bool = True) -> None:
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    if bank:
        p.add_argument("--preset", default=None, choices=list(PRESETS),
                       help="the embedded model's SAE bank (default: the cached one trained on the most tokens, "
                            "full > deep > quick; with validate --paper also the paper bank; else quick)")
        p.add_argument("--bank", help="a saved SAEBank folder instead of the embedded model's bank")
        p.add_argument("--lazy", action="store_true",
                       help="with --bank: read its SAEs from disk when needed, at most 4 in memory (a bank bigger "
                            "than memory; SAEBank.load(path, lazy=True))")
        p.add_argument("--train", action="store_true",
                       help="train the preset's bank first if it is not cached (without it, an untrained preset is "
                            "an error that says how to train it and what that costs)")


def _distributed(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--distributed", action="store_true",
                   help=f"share {what} out over the processes torchrun started (gloo on cpu, NCCL on cuda; rank 0 "
                        f"writes the same output as one process): torchrun --nproc-per-node N -m tl_featureflow "
                        f"{p.prog.split()[-1]} --distributed ...")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="with --distributed: how long a rank waits for the others before it ends the run with an "
                        "error (a rank that died or hangs; default: 600)")


def _method(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=data_free_names(),
                   help="a data-free matching method picks the matches (e.g. permutation: SAE Match's one-to-one "
                        "assignment); default: the decoder cosine's top-k")


def _feature(text: str) -> str:
    """argparse type of a feature argument: checked before anything loads (a bad one fails at once)."""
    from tl_featureflow.errors import FeatureFlowError
    from tl_featureflow.refs import FeatureRef

    try:
        return str(FeatureRef.parse(text))
    except FeatureFlowError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="featureflow",
        description="Trace, validate and steer SAE features across the layers of a TransformerLens model "
        "(the embedded SmolLM2-135M-Instruct, offline).",
        epilog="start with: featureflow demo",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    raw = argparse.RawDescriptionHelpFormatter

    demo = sub.add_parser("demo", help="the whole pipeline on the embedded model, ending in an HTML report",
                          description="Load the embedded SmolLM2, make sure its SAE bank exists (trained on first "
                          "use), pick seed features for a few themes, trace their flow, validate on held-out text, "
                          "steer with them (scored by the offline judge) and write an HTML report.",
                          epilog="examples:\n  featureflow demo\n  featureflow demo --themes religion love --samples 4"
                          "\n  featureflow demo --preset smoke --out /tmp/demo  # a rough bank in about a minute, for a try",
                          formatter_class=raw)
    _common(demo)
    demo.set_defaults(train=True)   # the demo's first run trains its quick bank (make demo does all set-up)
    demo.add_argument("--out", default="featureflow-out/demo", help="run folder (default: featureflow-out/demo)")
    demo.add_argument("--themes", nargs="+", default=["religion", "war"],
                      help="themes (default: religion war; also: love programming)")
    demo.add_argument("--texts", type=int, default=2, help="held-out texts for validation (default: 2)")
    demo.add_argument("--samples", type=int, default=2, help="generations per steering setting (default: 2)")
    demo.add_argument("--max-new-tokens", type=int, default=36, help="tokens per generation (default: 36)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser(
        "train-saes", help="train an SAE bank for the embedded model with SAELens",
        description="Train one SAE per (site, layer) on the offline corpus. Without --out/--layers/--sites/--tokens "
        "this builds (or reuses) the embedded model's default bank in the cache, which the other commands use.",
        epilog="examples:\n  featureflow train-saes --preset quick\n"
        "  featureflow train-saes --preset full\n"
        "  featureflow train-saes --preset quick --layers 10 11 12 --sites res mlp --out my-bank\n"
        "An interrupted run resumes from its last checkpoint when run again with the same arguments.",
        formatter_class=raw)
    train.add_argument("--preset", default="quick", choices=list(PRESETS),
                       help="quick: 6 middle layers, 393k tokens, ~16 min on 2 CPU cores; paper: Table 1's 12 SAEs at "
                       "1/4, 1/2, 3/4 of the depth, 1.6M tokens, ~1 h; deep: every layer, 197k tokens; full: every "
                       "layer, 2M tokens (GPU); "
                       "smoke: ~1 min, rough features for trying the pipeline; tiny: for tiny test models")
    train.add_argument("--layers", type=int, nargs="+", help="layers to train (default: the preset's)")
    train.add_argument("--sites", nargs="+", choices=list(SITES), help="sites (default: all three)")
    train.add_argument("--tokens", type=int, help="training tokens (default: the preset's)")
    train.add_argument("--out", help="run folder (default: the embedded model's bank in the cache)")
    train.add_argument("--trainer", default="fast", choices=["fast", "saelens"],
                       help="fast (default): SAELens's trainer with our sparse BatchTopK step (same maths, ~3.3x "
                       "faster); saelens: SAELens's own step")
    train.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    train.set_defaults(func=_train_saes)

    trace = sub.add_parser("trace", help="trace one feature's flow graph across layers",
                           description="Match the feature's decoder with the SAEs of neighbouring layers (data-free) "
                           "and follow its residual chain backward and forward, with MLP/attention side nodes.",
                           epilog="examples:\n  featureflow trace 14/res/249\n"
                           "  featureflow trace 14/res/249 --t-res 0.4 --html flow.html", formatter_class=raw)
    _common(trace)
    trace.add_argument("feature", type=_feature, help="layer/site/index, e.g. 14/res/249")
    trace.add_argument("--t-res", type=float, default=0.5, help="residual chain threshold (default: 0.5)")
    trace.add_argument("--t-module", type=float, default=0.15, help="MLP/attention node threshold (default: 0.15)")
    trace.add_argument("--direction", default="both", choices=["backward", "forward", "both"],
                       help="follow the residual chain backward, forward or both ways from the seed (default: both)")
    _method(trace)
    trace.add_argument("--out", help="graph JSON (default: featureflow-out/graphs/<feature>.json)")
    trace.add_argument("--html", help="also write the flow graph figure to this HTML file")
    trace.set_defaults(func=_trace)

    fmap = sub.add_parser("map", help="predecessor scores and groups of every feature of every layer",
                          description="The flow map: every res feature's best matches in res(L-1), mlp(L), att(L), "
                          "saved layer by layer (an interrupted run resumes).",
                          epilog="examples:\n  featureflow map\n  featureflow map --layers 13 14 --k 5 --out my-map\n"
                          "  torchrun --nproc-per-node 2 -m tl_featureflow map --distributed  # layer pairs over 2 ranks",
                          formatter_class=raw)
    _common(fmap)
    fmap.add_argument("--layers", type=int, nargs="+", help="layers (default: every res layer of the bank)")
    fmap.add_argument("--k", type=int, default=1, help="matches kept per feature and site (default: 1)")
    _method(fmap)
    fmap.add_argument("--out", default="featureflow-out/flowmap", help="folder (default: featureflow-out/flowmap)")
    _distributed(fmap, "the layer pairs")
    fmap.set_defaults(func=_map)

    val = sub.add_parser("validate", help="the deactivation experiment on held-out text",
                         description="For active res features, rescale their matched predecessors at the same token "
                         "and read the feature again (method section 5).",
                         epilog="examples:\n  featureflow validate --texts 4\n  featureflow validate --paper --texts 12\n"
                         "  featureflow validate --layers 13 15 17 --methods top1 random exhaustive --r 0 -1\n"
                         "  torchrun --nproc-per-node 2 -m tl_featureflow validate --distributed --texts 8",
                         formatter_class=raw)
    _common(val)
    val.add_argument("--texts", type=int, default=4, help="held-out texts of 128 tokens (default: 4)")
    val.add_argument("--layers", type=int, nargs="+", help="target layers (default: the bank's middle res layer)")
    val.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "pearson"], choices=list(METHODS),
                     help="matching methods to validate (default: all but pearson, which reads training tokens)")
    val.add_argument("--r", type=float, nargs="+", default=[0.0], help="rescaling factor(s); the first is the main")
    val.add_argument("--loss-samples", type=int, default=0, help="interventions per text with the LM-loss change")
    val.add_argument("--out", default=VALIDATE_OUT,
                     help=f"report JSON (default: {VALIDATE_OUT}); with --paper a folder (default: featureflow-out/table1)")
    val.add_argument("--paper", action="store_true",
                     help="the paper's Table-1 protocol at 1/4, 1/2, 3/4 of the depth (where the bank covers them): "
                          "its target set, top-1 cosine, Pearson from training tokens, exhaustive single-feature "
                          "search, plus attribution; writes table1.md, validation.json and report.html")
    val.add_argument("--pearson-tokens", type=int, default=100_000,
                     help="training tokens for Pearson correlations with --paper (default: 100000, the paper's)")
    _distributed(val, "the texts")
    val.set_defaults(func=_validate)

    steer = sub.add_parser("steer", help="generate with and without steering a feature (or its flow graph)",
                           description="Add a feature's direction (or rescale it) while generating, alone or along "
                           "its flow graph, and print unsteered vs steered generations.",
                           epilog="examples:\n  featureflow steer 14/res/249 --strength 16 --scale threshold\n"
                           "  featureflow steer 14/res/249 --mode cumulative --strength 8 --scale threshold\n"
                           "  featureflow steer 14/res/249 --op rescale --strength 0 --prompt 'I pray to'",
                           formatter_class=raw)
    _common(steer)
    steer.add_argument("feature", type=_feature, help="layer/site/index, e.g. 14/res/249")
    steer.add_argument("--strength", type=float, default=4.0,
                       help="s for add (in --scale units), r for rescale (default: 4)")
    steer.add_argument("--op", default="add", choices=["add", "rescale"],
                       help="add s times the direction, or rescale the feature's own activation by r (default: add)")
    steer.add_argument("--mode", default="feature", choices=["feature", "single", "cumulative"],
                       help="the feature alone, or its flow graph at one layer / cumulatively (default: feature)")
    steer.add_argument("--up-to-layer", type=int, help="layer for single/cumulative (default: seed / span end)")
    steer.add_argument("--scale", default="typical", choices=["unit", "decoder", "threshold", "typical"],
                       help="direction scale for add (default: typical, each feature's median activation on "
                            "held-out text, as in Python and the docs; threshold: SAE Match folding)")
    steer.add_argument("--positions", default="all", choices=["all", "prompt", "generated"],
                       help="which tokens are steered: all, the prompt's or the generated ones (default: all)")
    steer.add_argument("--prompt", default="I think", help="prompt (default: 'I think')")
    steer.add_argument("--max-new-tokens", type=int, default=36, help="tokens per generation (default: 36)")
    steer.add_argument("--samples", type=int, default=2, help="sampled generations (0: one greedy)")
    steer.add_argument("--seed", type=int, default=0, help="torch seed of the sampled generations (default: 0)")
    steer.set_defaults(func=_steer)

    rep = sub.add_parser("report", help="build the offline HTML report of a run folder",
                         description="One self-contained HTML file (plotly.js embedded) from a run folder: "
                         "graphs/*.json, flowmap/, validation.json, steering/*.json, run.json.",
                         epilog="examples:\n  featureflow report featureflow-out/demo\n"
                         "  featureflow report featureflow-out/demo --out report.html", formatter_class=raw)
    rep.add_argument("run_dir", help="run folder, e.g. featureflow-out/demo")
    rep.add_argument("--out", help="HTML file (default: RUN_DIR/report.html)")
    rep.set_defaults(func=_report)
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
    except KeyboardInterrupt:
        print("featureflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

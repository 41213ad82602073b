"""What a bank's training budget buys: top-1 matching, the exhaustive bound and EV against training tokens.

    .venv/bin/python demos/tokens_curve.py [--budgets 49152 98304 196608 393216] [--texts 8] [--out featureflow-out/curve]
    .venv/bin/python demos/tokens_curve.py --checkpoints RUN_DIR [--every 2] [--texts 8]

With ``--checkpoints`` no bank is trained: the points are the checkpoints of one long run (the
``paper`` preset's run folder; with a constant learning rate a checkpoint's bank is exactly the
bank of a run that stopped there, tests/saes/test_training.py), plus its final bank, at layer 15.

For each budget, a bank of the quick preset's settings at layers 14-15 (res, mlp, att; 6 SAEs) is
trained on that many tokens (resumable, cached in ``--out``), then validated the paper's way at
layer 15 on the same held-out texts (Table 1's target set; methods top-1 cosine, the paper's
exhaustive search over single features, attribution; live features only). Prints one Markdown
row per budget: EV of res15/mlp15/att15, top-1, exhaustive, the gap, attribution, n.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tl_featureflow as ff
from tl_featureflow.flow.contexts import feature_contexts
from tl_featureflow.saes import training
from tl_featureflow.saes.corpus import load_corpus
from tl_featureflow.saes.quality import evaluate_bank

KEYS = [("res", 14), ("res", 15), ("mlp", 15), ("att", 15)]


def _banks(model, args):
    """(tokens, bank, training seconds or None) per point of the curve."""
    if args.checkpoints:
        for tokens, folder in list(training.checkpoints(args.checkpoints).items())[args.every - 1::args.every]:
            yield tokens, training.load_checkpoint_bank(folder, keys=KEYS), None
        final = ff.SAEBank.load(Path(args.checkpoints) / "bank").select(layers=[14, 15])
        yield final.metadata["training_tokens"], ff.SAEBank({k: final[k] for k in KEYS}, metadata=final.metadata), None
        return
    for budget in args.budgets:
        start = time.perf_counter()
        bank = ff.train_bank(model, layers=[14, 15], preset="quick", training_tokens=budget,
                             out=Path(args.out) / f"bank-{budget}", progress=False)
        yield budget, bank, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[49_152, 98_304, 196_608, 393_216])
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--out", default="featureflow-out/curve")
    parser.add_argument("--checkpoints", help="a run folder: measure its checkpoints instead of training banks")
    parser.add_argument("--every", type=int, default=1, help="with --checkpoints: every n-th checkpoint (default: 1)")
    args = parser.parse_args()
    model = ff.load_embedded_model()
    heldout = load_corpus(model.tokenizer, "heldout", progress=False).tokens
    texts = heldout[: args.texts]
    rows = []
    for budget, bank, trained in _banks(model, args):
        if "quality" not in bank.metadata:
            bank.metadata["quality"] = evaluate_bank(model, bank, heldout[:128], loss_rows=0, progress=False).to_dict()
        contexts = feature_contexts(model, bank, progress=False)
        alive = contexts.alive()
        report = ff.validate(ff.FlowTracer(bank, model, contexts=None), model, texts, layers=[15],
                             methods=("top1", "exhaustive_single", "attribution"), alive=alive, progress=False)
        table = report.table1()
        quality = {(r["site"], r["layer"]): r["explained_variance"] for r in bank.metadata["quality"]["rows"]}
        top1, exh, attr = (table.get(m, {}).get("success_rate", float("nan"))
                           for m in ("top1", "exhaustive_single", "attribution"))
        row = (f"| {budget:,} | {quality[('res', 15)]:.3f} | {quality[('mlp', 15)]:.3f} | {quality[('att', 15)]:.3f} | "
               f"{100 * top1:.1f}% | {100 * exh:.1f}% | {100 * (exh - top1):.1f} | {100 * attr:.1f}% | "
               f"{table['top1']['n']} | {'-' if trained is None else f'{trained:.0f} s'} |")
        rows.append(row)
        print(row, flush=True)
    print("| training tokens | EV res15 | EV mlp15 | EV att15 | top-1 | exhaustive (paper's) | gap (points) | "
          "attribution | n | training time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

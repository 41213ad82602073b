"""validate() on the embedded quick bank, loaded by path so that an older checkout reads today's bank.

    B=$(ls -d ~/.cache/tl_featureflow/banks/*quick*v5)/bank
    git worktree add /tmp/before 28a0406 && git worktree add /tmp/after HEAD
    PYTHONPATH=/tmp/before OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/validation_before_after.py $B before
    PYTHONPATH=/tmp/after OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/validation_before_after.py $B after

Layer 15, 2 held-out texts, r = 0, Pearson from 64 training rows; best of 2 per method set.
"""
import sys
import time

import torch

import tl_featureflow as ff
from tl_featureflow.causal.pearson import pearson_matches
from tl_featureflow.saes.corpus import load_corpus

bank_dir, label = sys.argv[1], sys.argv[2]
model = ff.load_embedded_model()
bank = ff.SAEBank.load(bank_dir)
texts = load_corpus(model.tokenizer, "heldout", progress=False).tokens[:2]
layer = 15
pearson = pearson_matches(model, bank, [layer], tokens=load_corpus(model.tokenizer, "train", progress=False).tokens[:64], progress=False)
tracer = ff.FlowTracer(bank, model, contexts=None)
for name, methods in {"today": ("top1", "random", "exhaustive"),
                      "paper": ("top1", "pearson", "exhaustive_single", "attribution", "exhaustive")}.items():
    best = None
    for _ in range(2):
        start = time.perf_counter()
        report = ff.validate(tracer, model, texts, layers=[layer], methods=methods, pearson=pearson, progress=False)
        s = time.perf_counter() - start
        best = s if best is None else min(best, s)
    print(f"{label} {name}: {len(report.rows)} rows, best of 2 {best:.2f} s, {len(report.rows)/best:.1f} rows/s, threads {torch.get_num_threads()}", flush=True)

"""Timing of validate on a tiny gated model, for before/after comparisons across checkouts (docs/performance.md,
"Validation as a one-way pass"): run it with PYTHONPATH set to each checkout.

    PYTHONPATH=/tmp/wt .venv/bin/python tests/benchmarks/validation_passes.py   # another checkout
    .venv/bin/python tests/benchmarks/validation_passes.py                      # this one
"""

import time

import torch

import tl_featureflow as ff
from tl_featureflow.synthetic import random_bank, tiny_model

torch.set_num_threads(1)
model = tiny_model(gated=True, n_layers=8, d_model=128)
bank = random_bank(range(8), d_sae=256, d_model=128, arch="jumprelu")
tr = ff.FlowTracer(bank, model, contexts=None)
toks = torch.randint(1, 100, (4, 64), generator=torch.Generator().manual_seed(0))
for methods in (("top1", "random", "attribution"), ("top1", "exhaustive_single", "attribution")):
    best = 1e9
    for _ in range(2):
        t = time.perf_counter()
        ff.validate(tr, model, toks, layers=[3, 5, 7], methods=methods, max_targets=4, positions_per_text=3, progress=False)
        best = min(best, time.perf_counter() - t)
    print(methods, f"{best:.2f} s")

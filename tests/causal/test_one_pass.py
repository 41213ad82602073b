"""Validation as a one-way pass (issue 23): per text one feature pass and one pass for every validated layer's
stream and sites, then layer-local reruns only; and every row equals the full-forward reference."""

from __future__ import annotations

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.causal.interventions import Intervention, intervened
from tl_featureflow.synthetic import random_bank, tiny_model

METHODS = ("top1", "top5", "random", "permutation", "pearson", "exhaustive", "exhaustive_single", "attribution")


@pytest.fixture(scope="module")
def run():
    model = tiny_model(gated=True)
    bank = random_bank(range(4), d_sae=48, d_model=64, arch="jumprelu")
    tracer = ff.FlowTracer(bank, model, contexts=None)
    tokens = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    return model, bank, tracer, tokens


def _full_forwards(model, fn) -> int:
    """How many forwards from token ids ``fn`` runs (hook_embed fires once per such forward)."""
    calls = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: calls.append(1))]):
        fn()
    return len(calls)


@pytest.mark.parametrize("layers", [[1], [1, 2, 3]])
@pytest.mark.parametrize("methods", [METHODS, tuple(m for m in METHODS if m != "pearson")])
def test_each_text_is_run_twice_whatever_the_methods_and_layers(run, layers, methods):
    model, bank, tracer, tokens = run
    assert ff.FlowTransformer.from_hooked(model) is model       # validate runs this object, hooks and all
    n = _full_forwards(model, lambda: ff.validate(tracer, model, tokens, layers=layers, methods=methods,
                                                  progress=False))
    # per text a feature pass and a pass for every layer's stream and sites (before: up to three more per layer);
    # with Pearson fitted on the texts, one feature pass over all of them serves every text
    n_texts = tokens.shape[0]
    assert n == (1 + n_texts if "pearson" in methods else 2 * n_texts)


def test_every_row_equals_its_full_forward_reference(run):
    model, bank, tracer, tokens = run
    report = ff.validate(tracer, model, tokens, layers=[1, 2], methods=METHODS, r=[0.0, 0.5],
                         sweep_methods=("top1",), progress=False)
    assert len(report.rows) > 50
    checked = 0
    for row in report.rows[::7]:
        target = ff.FeatureRef.parse(row.target)
        items = {}
        for text in row.deactivated:
            ref = ff.FeatureRef.parse(text)
            items.setdefault(ref.key, []).append(ref.index)
        plan = [Intervention(site, layer, tuple(f), (row.position,), row.r) for (site, layer), f in items.items()]
        with intervened(model, bank, plan), torch.no_grad():
            _, cache = model.run_with_cache(tokens[row.text:row.text + 1], names_filter=[ff.hook_name("res", target.layer)])
            z = bank[target.key].encode(cache[ff.hook_name("res", target.layer)][0, row.position])[target.index]
        assert float(z) == pytest.approx(row.z_new, abs=1e-4), row
        checked += 1
    assert checked > 5

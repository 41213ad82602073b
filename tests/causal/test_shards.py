"""Validation in shards (issue 25): every text draws from a generator of its own, so texts validated apart and
merged (what the ranks of a distributed run do) give the rows of one run; ValidationReport.merge refuses what
is not one run's shards."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.causal import experiment
from tl_featureflow.causal.results import ValidationReport
from tl_featureflow.synthetic import random_bank, tiny_model

ALL_METHODS = ["top1", "top5", "random", "permutation", "pearson", "exhaustive", "exhaustive_single", "attribution"]


@pytest.fixture(scope="module")
def run():
    model = tiny_model(gated=True)
    bank = random_bank(range(4), d_sae=48, d_model=64, arch="jumprelu")
    tracer = ff.FlowTracer(bank, model, contexts=None)
    tokens = torch.randint(1, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    return model, tracer, tokens


def _digests(report: ValidationReport, n_texts: int) -> list[tuple[int, str]]:
    """Per text, how many rows and a digest of what they are (positions, targets, methods, r, what was
    deactivated, which got a loss change): the random draws' outcome, no float activations."""
    out = []
    for t in range(n_texts):
        rows = [[r.text, r.position, r.target, r.method, r.r, r.deactivated, r.loss_change is not None]
                for r in report.rows if r.text == t]
        out.append((len(rows), hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]))
    return out


def test_a_fixed_run_draws_as_before_for_its_first_text_and_as_pinned_for_the_others(run):
    """Before issue 25 one generator ran through all texts; now text t has its own (text 0 keeps the run's seed).
    Text 0's rows are those the old code made (recorded before the change); texts 1 and 2 are pinned anew."""
    model, tracer, tokens = run
    report = ff.validate(tracer, model, tokens, layers=[1, 2], methods=["top1", "random", "exhaustive_single"],
                         r=[0.0, 0.5], loss_samples=2, seed=3, progress=False)
    assert _digests(report, 3) == [(883, "1e43f7ccd690f0a9"),      # = the single-generator code's text 0
                                   (729, "f3286dd957c6f982"), (728, "63c88fac4417bc64")]


@pytest.mark.parametrize("cuts", [[0, 1, 3], [0, 2, 2, 3]], ids=["2 shards", "3 shards, one empty"])
def test_shards_validated_apart_and_merged_equal_one_run_row_for_row(run, cuts):
    model, tracer, tokens = run
    settings = dict(layers=[1, 2], methods=ALL_METHODS, r=[0.0, -1.0], loss_samples=2, seed=5, progress=False)
    whole = ff.validate(tracer, model, tokens, **settings)
    parts = [ff.validate(tracer, model, tokens, texts=range(a, b), **settings)
             for a, b in zip(cuts, cuts[1:], strict=False)]
    assert parts[0].meta["texts"] == list(range(cuts[0], cuts[1]))
    merged = ValidationReport.merge(parts[::-1])                       # in any order
    assert len(whole.rows) > 100 and {r.method for r in whole.rows} == set(ALL_METHODS)
    assert merged.rows == whole.rows                                   # every field, floats exactly
    assert merged.group_counts == whole.group_counts and merged.attributions == whole.attributions
    assert merged.meta == whole.meta and merged.to_json() == whole.to_json()
    # the shards' own draws: not those of a run over their texts alone, numbered from 0
    alone = ff.validate(tracer, model, tokens[cuts[1]:], **settings)
    assert [r.position for r in alone.rows if r.text == 0] != [r.position for r in whole.rows if r.text == cuts[1]]


def test_merge_refuses_reports_that_are_not_shards_of_one_run(run):
    model, tracer, tokens = run
    settings = dict(layers=[1], methods=["top1"], progress=False)
    a = ff.validate(tracer, model, tokens, texts=[0, 1], **settings)
    b = ff.validate(tracer, model, tokens, texts=[1, 2], **settings)
    with pytest.raises(ff.InvalidArgumentError, match="text 1 is in reports 0 and 1"):
        ValidationReport.merge([a, b])
    c = ff.validate(tracer, model, tokens, texts=[2], seed=1, **settings)
    with pytest.raises(ff.InvalidArgumentError, match=r"report 1 .* differs in \['seed'\]"):
        ValidationReport.merge([a, c])
    with pytest.raises(ff.InvalidArgumentError, match="non-empty list of ValidationReports"):
        ValidationReport.merge([a, "b"])


@pytest.mark.parametrize("texts, match", [([3], r"text=3 is out of range \(in texts; there are 3 texts\)"),
                                          ([2, 1], "distinct indices in increasing order"),
                                          ("01", "expected a sequence of text indices")])
def test_bad_texts_name_what_was_expected(run, texts, match):
    model, tracer, tokens = run
    with pytest.raises(ff.InvalidArgumentError, match=match):
        ff.validate(tracer, model, tokens, layers=[1], methods=["top1"], texts=texts, progress=False)


def test_a_failure_says_which_text_it_happened_on(run, monkeypatch):
    model, tracer, tokens = run
    layer_rows = experiment._Experiment.layer_rows

    def failing(self, t, *args, **kwargs):
        if t == 2:
            raise RuntimeError("planted failure")
        return layer_rows(self, t, *args, **kwargs)

    monkeypatch.setattr(experiment._Experiment, "layer_rows", failing)
    with pytest.raises(RuntimeError, match="planted failure") as info:
        ff.validate(tracer, model, tokens, layers=[1], methods=["top1"], progress=False)
    if hasattr(info.value, "add_note"):
        assert info.value.__notes__ == ["while validating text 2 (of 3)"]

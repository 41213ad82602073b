"""Bad values for the numeric arguments of the public API: each gets the error class expected, naming it.

Cases are generated from one table per entry point (argument -> values that must be refused), so a new
argument is one line; the issue-24 numbers name the probes that used to go wrong.
"""

from __future__ import annotations

import math

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.steer.steerer import Steerer
from tl_featureflow.synthetic import planted_chain_bank, tiny_model

NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def setting():
    model = tiny_model()
    bank, _ = planted_chain_bank()
    tokens = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    return model, bank, ff.FlowTracer(bank, model, contexts=None), tokens


# validate(...): argument -> values refused (issue 24 #5: r=nan gave every z_new NaN, positions 0 gave 0 rows, ...)
VALIDATE_BAD = {
    "r": [NAN, INF, -INF, [0.0, INF], [0.0, NAN], [], "0", None],
    "positions_per_text": [0, -1, 2.5, "5", True, None],
    "max_targets": [0, -1, 1.5, None],
    "batch_rows": [0, -1, 0.5],
    "loss_samples": [-1, 1.5],
    "seed": [-1, 0.5, "0"],
    "methods": [[], (), "top1", ["top1", "banana"]],
    "layers": ["2", [2.0], [], 2, [-1], [True]],
}


@pytest.mark.parametrize("argument,value", [(a, v) for a, vs in VALIDATE_BAD.items() for v in vs],
                         ids=lambda x: repr(x))
def test_validate_refuses(setting, argument, value):
    _, _, tracer, tokens = setting
    kwargs = {"layers": [2], "methods": ["top1"], argument: value}
    with pytest.raises(ff.FeatureFlowError, match=argument.rstrip("s") if argument != "r" else "r="):
        tracer.validate(tokens, progress=False, **kwargs)


def test_validate_still_runs_on_good_values(setting):
    _, _, tracer, tokens = setting
    report = tracer.validate(tokens, layers=(2,), methods=["top1"], r=[0.0, 0.5], positions_per_text=3,
                             max_targets=2, progress=False)
    assert report.rows and all(math.isfinite(row.z_new) for row in report.rows)


# Steerer(scale={ref: value}) (issue 24 #6: NaN and inf scales gave NaN logits)
@pytest.mark.parametrize("value", [NAN, INF, -INF, 0.0, -1.0, "1", None], ids=repr)
def test_steerer_refuses_a_scale_that_is_not_a_positive_number(setting, value):
    model, bank, _, _ = setting
    with pytest.raises(ff.InvalidArgumentError, match=r"scale\['2/res/1'\]"):
        Steerer(model, bank, scale={"2/res/1": value})


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=repr)
def test_steerer_refuses_non_finite_strengths(setting, value):
    model, bank, _, _ = setting
    with pytest.raises(ff.FeatureFlowError, match="NaN or inf"):
        Steerer(model, bank).add("2/res/1", value)


# tokens longer than the context (issue 24 #15: a bare RuntimeError deep inside the forward)
def test_tokens_longer_than_the_context_are_named(setting):
    model, bank, tracer, _ = setting
    long = torch.randint(1, 100, (1, model.cfg.n_ctx + 1))
    flow = ff.FlowTransformer.from_hooked(model)
    with pytest.raises(ff.InvalidArgumentError, match=f"context is {model.cfg.n_ctx}"):
        tracer.validate(long, layers=[2], methods=["top1"], progress=False)
    with flow.attached(bank), pytest.raises(ff.InvalidArgumentError, match="n_ctx"):
        flow.run_with_features(long)


# devices that do not exist here (issue 24 #16: bare AssertionError / RuntimeError, or a "corrupt" bank)
ABSENT = ["banana", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]) + (
    [] if torch.backends.mps.is_available() else ["mps"])


@pytest.mark.parametrize("device", ABSENT)
def test_devices_that_do_not_exist_here_are_named(setting, tmp_path_factory, device):
    model, bank, _, _ = setting
    path = tmp_path_factory.mktemp("bank") / "bank"
    bank.save(path)
    for make in (lambda: Steerer(model, bank, device=device), lambda: ff.FlowTracer(bank, device=device),
                 lambda: tiny_model(device=device), lambda: ff.SAEBank.load(path, device=device)):
        with pytest.raises(ff.InvalidArgumentError, match=f"device={device!r}"):
            make()


def test_a_generate_past_the_context_is_refused_before_it_starts(setting):
    """#15: a steered generate past n_ctx failed part-way with a bare RuntimeError, and later forwards with
    gradients failed (rotary buffers left as inference tensors)."""
    model, bank, _, _ = setting
    prompt = torch.randint(1, 100, (1, model.cfg.n_ctx - 4))
    kwargs = dict(do_sample=False, stop_at_eos=False, verbose=False)
    with Steerer(model, bank, positions="generated").add("2/res/1", 2.0):
        with pytest.raises(ff.InvalidArgumentError, match="at most 4 new tokens"):
            model.generate(prompt, max_new_tokens=5, **kwargs)
        assert model.generate(prompt, max_new_tokens=4, **kwargs).shape == (1, model.cfg.n_ctx)
    model(prompt).sum().backward()                             # gradients still flow afterwards
    model.zero_grad(set_to_none=True)

"""Bad arguments raise InvalidArgumentError: a FeatureFlowError and a ValueError, naming the input."""

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.synthetic import make_bank, planted_chain_bank


@pytest.fixture
def tracer():
    return ff.FlowTracer(planted_chain_bank()[0])


@pytest.mark.parametrize("call, names", [
    (lambda t, m: t.match(("res", 1), ("res", 2), k=0), "k=0"),
    (lambda t, m: t.trace("2/res/1", direction="sideways"), "sideways"),
    (lambda t, m: t.classify(2, thresholds="loose"), "loose"),
    (lambda t, m: ff.flow.matching.topk_cosine(torch.zeros(3), torch.zeros(3, 2)), "2-D"),
    (lambda t, m: ff.Steerer(m, make_bank(), positions="middle", scale="unit"), "middle"),
    (lambda t, m: ff.Steerer(m, make_bank(), scale="unit").along(t.trace("2/res/1"), 1.0, schedule="cosine"), "cosine"),
    (lambda t, m: ff.Steerer(m, make_bank(), scale="unit").add("1/res/0", [[1.0]]), "coefficient"),
    (lambda t, m: ff.validate(t, m, torch.zeros(1, 4, dtype=torch.long), layers=[1], methods=["magic"]), "magic"),
])
def test_bad_arguments_are_value_errors_naming_the_input(tracer, tiny_model, call, names):
    with pytest.raises(ff.InvalidArgumentError, match=names) as info:
        call(tracer, tiny_model)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ff.FeatureFlowError)

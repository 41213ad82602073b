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
        Steerer(model, bank, scale="unit").add("2/res/1", value)


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
    for make in (lambda: Steerer(model, bank, device=device, scale="unit"), lambda: ff.FlowTracer(bank, device=device),
                 lambda: tiny_model(device=device), lambda: ff.SAEBank.load(path, device=device)):
        with pytest.raises(ff.InvalidArgumentError, match=f"device={device!r}"):
            make()


def test_a_generate_past_the_context_is_refused_before_it_starts(setting):
    """#15: a steered generate past n_ctx failed part-way with a bare RuntimeError, and later forwards with
    gradients failed (rotary buffers left as inference tensors)."""
    model, bank, _, _ = setting
    prompt = torch.randint(1, 100, (1, model.cfg.n_ctx - 4))
    kwargs = dict(do_sample=False, stop_at_eos=False, verbose=False)
    with Steerer(model, bank, positions="generated", scale="unit").add("2/res/1", 2.0):
        with pytest.raises(ff.InvalidArgumentError, match="at most 4 new tokens"):
            model.generate(prompt, max_new_tokens=5, **kwargs)
        assert model.generate(prompt, max_new_tokens=4, **kwargs).shape == (1, model.cfg.n_ctx)
    model(prompt).sum().backward()                             # gradients still flow afterwards
    model.zero_grad(set_to_none=True)


# -- every numeric argument of the public API --------------------------------------------------------
# One line per entry point: how to call it, and its numeric arguments with the values their domain refuses
# beyond those of their type. The values every int and float argument refuses are generated from the
# signature's annotation (BY_TYPE); `test_every_numeric_argument_of_the_public_api_is_probed` reads the
# signatures of everything `tl_featureflow` exports, so a new numeric argument fails until it has a line.
BY_TYPE = {"int": [1.5, "1", True, NAN, None], "float": [NAN, INF, -INF, "0.5", True, None]}
K = [0, -1]
QUANTILE = [0.0, 1.0, 1.5, -0.1]
COSINE = [1.5, -1.5]


def _calls(model, bank, tracer, tokens, graph, fmap, tmp):
    """entry point -> (call taking the argument as a keyword, {argument: refused values beyond its type's})."""
    return {
        "FeatureRef": (lambda **kw: ff.FeatureRef(**{"layer": 2, "site": "res", "index": 1, **kw}),
                       {"layer": [-2], "index": [-1]}),   # -1 is the embedding SAE's layer
        "hook_name": (lambda **kw: ff.hook_name(**{"site": "res", "layer": 2, **kw}), {"layer": [-2]}),
        "load_embedded_model": (lambda **kw: ff.load_embedded_model(**kw), {"n_ctx": [0, -1]}),
        "train_bank": (lambda **kw: ff.train_bank(model, out=tmp / "bank", progress=False, **kw),
                       {"training_tokens": [0, -1], "seed": [-1]}),
        "SAEBank.d_sae": (lambda **kw: bank.d_sae(**{"site": "res", "layer": 2, **kw}), {"layer": [-1, 99]}),
        "SAEBank.decoder": (lambda **kw: bank.decoder(**{"site": "res", "layer": 2, **kw}), {"layer": [-1, 99]}),
        "SAEBank.model_decoder": (lambda **kw: bank.model_decoder(**{"site": "res", "layer": 2, **kw}),
                                  {"layer": [-1, 99]}),
        "FlowTracer": (lambda **kw: ff.FlowTracer(bank, model, contexts=None, **kw), {"chunk_size": [0, -1]}),
        "FlowTracer.predecessor_keys": (lambda **kw: tracer.predecessor_keys(**kw), {"layer": [-2]}),
        "FlowTracer.match": (lambda **kw: tracer.match(("res", 1), ("res", 2), **kw), {"k": K + [10_000]}),
        "FlowTracer.similar": (lambda **kw: tracer.similar("2/res/1", ("res", 1), **kw), {"k": K}),
        "FlowTracer.successors": (lambda **kw: tracer.successors("1/res/1", **kw), {"k": K}),
        "FlowTracer.predecessors": (lambda **kw: tracer.predecessors("2/res/1", **kw), {"k": K + [10_000]}),
        "FlowTracer.scores": (lambda **kw: tracer.scores(**{"layer": 2, **kw}), {"layer": [-1, 99], "k": K}),
        "FlowTracer.pair_scores": (lambda **kw: tracer.pair_scores(**{"layer": 2, "site": "res", **kw}),
                                   {"layer": [-1, 99], "k": K}),
        "FlowTracer.chance_thresholds": (lambda **kw: tracer.chance_thresholds(**{"layer": 2, **kw}),
                                         {"layer": [-1, 99], "quantile": QUANTILE, "n_probe": [0, -1]}),
        "FlowTracer.thresholds": (lambda **kw: tracer.thresholds(**{"layer": 2, **kw}),
                                  {"layer": [-1, 99], "quantile": QUANTILE}),
        "FlowTracer.classify": (lambda **kw: tracer.classify(**{"layer": 2, **kw}),
                                {"layer": [-1, 99], "quantile": QUANTILE}),
        "FlowTracer.trace": (lambda **kw: tracer.trace("2/res/1", **kw), {"t_res": COSINE, "t_module": COSINE}),
        "FlowTracer.flow_map": (lambda **kw: tracer.flow_map(progress=False, **kw), {"k": K, "quantile": QUANTILE}),
        "FlowTracer.map_plan": (lambda **kw: tracer.map_plan(**kw), {"k": K, "quantile": QUANTILE}),
        "FlowMap.chain_lengths": (lambda **kw: fmap.chain_lengths(**kw), {"t_res": COSINE}),
        "FlowMap.classify": (lambda **kw: fmap.classify(**kw), {"layer": [-1, 99]}),
        "FlowGraph.refs_up_to": (lambda **kw: graph.refs_up_to(**kw), {"layer": [-2]}),
        "feature_contexts": (lambda **kw: ff.feature_contexts(model, bank, tokens, cache=False, progress=False, **kw),
                             {"n": [0, -1], "rows": [0, -1], "batch_size": [0, -1]}),
        "Steerer.add_direction": (lambda **kw: ff.Steerer(model, bank, scale="unit").add_direction(
            **{"site": "res", "layer": 2, "direction": torch.ones(model.cfg.d_model), "strength": 1.0, **kw}),
            {"layer": [-1, 99]}),
        "Steerer.along": (lambda **kw: ff.Steerer(model, bank, scale="unit").along(graph, 2.0, **kw), {"alpha": [], "up_to_layer": [-1, 99]}),
    }


#: numeric arguments not probed here, and why
NOT_PROBED = {
    ("FlowTransformer.generate", "max_new_tokens"): "TransformerLens's own generate: its behaviour kept",
    ("FlowTransformer.generate", "temperature"): "TransformerLens's own generate: its behaviour kept",
    ("FlowTransformer.generate", "freq_penalty"): "TransformerLens's own generate: its behaviour kept",
    ("Matching", "k"): "a result record that FlowTracer.match builds (its k is checked there)",
    ("FlowGraph", "t_res"): "a record: FlowGraph checks itself on construction (test_files.py), NaN = unknown",
    ("FlowGraph", "t_module"): "a record: FlowGraph checks itself on construction (test_files.py), NaN = unknown",
}


def _kind(annotation: object) -> str | None:
    text = str(annotation).replace(" | None", "")
    return text if text in BY_TYPE else None


def _numeric_arguments() -> dict[tuple[str, str], str]:
    """(entry point, argument) -> "int" / "float" for everything ``tl_featureflow`` exports, from the signatures."""
    import inspect

    found = {}
    for name in ff.__all__:
        obj = getattr(ff, name)
        if inspect.ismodule(obj) or not callable(obj):
            continue
        members = [(name, obj.__init__ if inspect.isclass(obj) else obj)]
        if inspect.isclass(obj):
            members += [(f"{name}.{m}", f) for m, f in vars(obj).items() if not m.startswith("_") and callable(f)]
        for entry, function in members:
            try:
                parameters = inspect.signature(function).parameters.values()
            except (TypeError, ValueError):
                continue
            for p in parameters:
                if _kind(p.annotation):
                    found[(entry, p.name)] = _kind(p.annotation)
    return found


@pytest.fixture(scope="module")
def calls(setting, tmp_path_factory):
    model, bank, tracer, tokens = setting
    graph = tracer.trace("2/res/1")
    return _calls(model, bank, tracer, tokens, graph, tracer.flow_map(progress=False), tmp_path_factory.mktemp("api"))


def test_every_numeric_argument_of_the_public_api_is_probed(setting):
    model, bank, tracer, tokens = setting
    table = _calls(model, bank, tracer, tokens, None, None, None)
    probed = {(entry, argument) for entry, (_, arguments) in table.items() for argument in arguments}
    probed |= {("validate", argument) for argument in VALIDATE_BAD} | {("FlowTracer.validate", a) for a in VALIDATE_BAD}
    missing = set(_numeric_arguments()) - probed - set(NOT_PROBED)
    assert not missing, f"numeric arguments of the public API without a line in _calls: {sorted(missing)}"
    assert len(probed) >= 30


def _cases():
    arguments = _numeric_arguments()
    table = _calls(*([None] * 7))                                 # the lambdas are not called here
    for entry, (_, domain) in table.items():
        for argument, extra in domain.items():
            kind = arguments.get((entry, argument), "int")
            optional = argument in ("n_ctx", "training_tokens", "chunk_size", "up_to_layer")
            for value in BY_TYPE[kind] + extra:
                if not (value is None and optional):
                    yield pytest.param(entry, argument, value, id=f"{entry}({argument}={value!r})")


@pytest.mark.parametrize("entry,argument,value", list(_cases()))
def test_every_numeric_argument_refuses_bad_values_by_name(calls, entry, argument, value):
    call, _ = calls[entry]
    with pytest.raises(ff.FeatureFlowError, match=argument):
        call(**{argument: value})

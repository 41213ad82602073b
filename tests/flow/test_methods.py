"""The registry of matching methods (issue 23): validation dispatches on what a method needs, never on its
name, so a new method is one function and one register() call."""

from __future__ import annotations

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.flow import methods
from tl_featureflow.synthetic import planted_chain_bank, random_bank, tiny_model


@pytest.fixture
def toy_method():
    """A data-free toy: every res(L) feature matched to the predecessor feature of LOWEST cosine."""
    def lowest(context, layer, site, src):
        bank = context.tracer.bank
        cos = bank.decoder("res", layer) @ bank.decoder(*src).T        # unit rows: cosines
        return cos.argmin(dim=1, keepdim=True)

    method = methods.register(methods.MatchingMethod("lowest", "decoders", table=lowest))
    yield method
    methods.unregister("lowest")


def test_a_registered_method_validates_and_its_rows_remove_what_its_table_says(toy_method):
    model, bank = tiny_model(), random_bank(range(4), d_sae=48, d_model=64, arch="jumprelu")   # no tied cosines
    tracer = ff.FlowTracer(bank, model, contexts=None)
    tokens = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    report = ff.validate(tracer, model, tokens, layers=[2], methods=["lowest", "top1"], progress=False)
    rows = [row for row in report.rows if row.method == "lowest"]
    assert rows and report.group_counts["2"]["lowest"]
    keys = tracer.predecessor_keys(2)
    for row in rows:
        target = int(row.target.split("/")[-1])
        expected = set()
        for site, key in keys.items():
            cos = bank.decoder("res", 2)[target] @ bank.decoder(*key).T
            expected.add(f"{key[1]}/{site}/{int(cos.argmin())}")
        assert set(row.deactivated) <= expected          # only its table's choices (those active at the token)
    # and top1 in the same run chose differently somewhere: the toy is not cosine's top-1 under another name
    top1 = {(r.text, r.position, r.target): r.deactivated for r in report.rows if r.method == "top1"}
    assert any(top1.get((r.text, r.position, r.target)) != r.deactivated for r in rows)


def test_methods_are_dispatched_on_needs_so_a_renamed_builtin_gives_the_same_rows():
    """A copy of exhaustive_single under another name: the same rows (validation never branches on names)."""
    builtin = methods.get("exhaustive_single")
    methods.register(methods.MatchingMethod("my_search", builtin.needs, picks=builtin.picks))
    try:
        model, (bank, _) = tiny_model(), planted_chain_bank()
        tracer = ff.FlowTracer(bank, model, contexts=None)
        tokens = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(1))
        report = ff.validate(tracer, model, tokens, layers=[1, 2], methods=["exhaustive_single", "my_search"],
                             progress=False)
    finally:
        methods.unregister("my_search")
    mine = [(r.text, r.position, r.target, r.deactivated, r.z_new) for r in report.rows if r.method == "my_search"]
    theirs = [(r.text, r.position, r.target, r.deactivated, r.z_new) for r in report.rows
              if r.method == "exhaustive_single"]
    assert mine == theirs and mine


def test_the_registry_refuses_what_it_cannot_run():
    with pytest.raises(ff.FeatureFlowError, match="unknown matching method 'nope'.*top1"):
        methods.get("nope")
    with pytest.raises(ff.FeatureFlowError, match="a table is given exactly when needs='decoders'"):
        methods.MatchingMethod("x", "decoders")
    with pytest.raises(ff.FeatureFlowError, match="a fit is given exactly when needs='activations'"):
        methods.MatchingMethod("x", "activations")
    with pytest.raises(ff.FeatureFlowError, match="picks='one' is for"):
        methods.MatchingMethod("x", "decoders", picks="one", table=lambda *a: None)
    with pytest.raises(ff.FeatureFlowError, match="needs='data'"):
        methods.MatchingMethod("x", "data")
    with pytest.raises(ff.FeatureFlowError, match="'top1' is registered: pass replace=True"):
        methods.register(methods.get("top1"))
    with pytest.raises(ff.FeatureFlowError, match="built-in"):
        methods.unregister("top1")
    with pytest.raises(ff.FeatureFlowError, match="unknown matching methods \\['nope'\\]"):
        model, (bank, _) = tiny_model(), planted_chain_bank()
        ff.validate(ff.FlowTracer(bank, model, contexts=None), model, torch.ones(1, 4, dtype=torch.long),
                    layers=[2], methods=["nope"], progress=False)


def test_every_builtin_method_is_registered_once_with_what_it_needs():
    assert methods.METHODS == ("top1", "top5", "random", "permutation", "pearson", "exhaustive",
                               "exhaustive_single", "attribution")
    needs = {name: methods.get(name).needs for name in methods.METHODS}
    assert needs == {"top1": "decoders", "top5": "decoders", "random": "decoders", "permutation": "decoders",
                     "pearson": "activations", "exhaustive": "search", "exhaustive_single": "search",
                     "attribution": "attribution"}


# -- tracing and the flow map through the registry -------------------------------------------------------------
def _two_layer_bank():
    """res(0) = [a, b], res(1) = [f0, f1] with cos(f0, a) = 0.9, cos(f1, a) = 0.8, cos(f1, b) = 0.6, cos(f0, b) = 0:
    the cosine's top-1 sends both f0 and f1 to a (many-to-one); SAE Match's permutation (the assignment of
    largest total cosine, 1.5 against 0.8) sends f0 -> a and f1 -> b."""
    from tl_featureflow.synthetic import sae_from_decoder

    E = torch.eye(16)
    res0 = torch.stack([E[0], E[1]])
    res1 = torch.stack([0.9 * E[0] + 0.19 ** 0.5 * E[2], 0.8 * E[0] + 0.6 * E[1]])
    return ff.SAEBank({("res", 0): sae_from_decoder("res", 0, res0), ("res", 1): sae_from_decoder("res", 1, res1)})


def test_trace_takes_a_data_free_method_from_the_registry():
    tracer = ff.FlowTracer(_two_layer_bank(), contexts=None)
    edges = lambda graph: sorted((str(e.src), str(e.dst), round(e.score, 4)) for e in graph.edges)  # noqa: E731
    # backward: cosine top-1 (the default, and "top1") against the permutation
    assert edges(tracer.trace("1/res/1", direction="backward")) == [("0/res/0", "1/res/1", 0.8)]
    assert edges(tracer.trace("1/res/1", direction="backward", method="top1")) == [("0/res/0", "1/res/1", 0.8)]
    assert edges(tracer.trace("1/res/1", direction="backward", method="permutation")) == [("0/res/1", "1/res/1", 0.6)]
    # forward from b: the cosine's argmax in res(1) is f1; no res(1) feature names b its top-1; the permutation does
    assert edges(tracer.trace("0/res/1", direction="forward")) == [("0/res/1", "1/res/1", 0.6)]
    assert edges(tracer.trace("0/res/1", direction="forward", method="top1")) == []
    assert edges(tracer.trace("0/res/1", direction="forward", method="permutation")) == [("0/res/1", "1/res/1", 0.6)]
    graph = tracer.trace("0/res/1", method="permutation")
    assert graph.meta["method"] == "permutation" and tracer.trace("0/res/1").meta["method"] == "cosine"
    assert ff.FlowGraph.from_dict(graph.to_dict()).meta["method"] == "permutation"
    # the scores: a method's pair cosines; top1's equal the cosine top-1's
    assert tracer.scores(1, method="permutation").indices["res"][:, 0].tolist() == [0, 1]
    assert torch.allclose(tracer.scores(1, method="permutation").scores["res"][:, 0], torch.tensor([0.9, 0.6]))
    plain, top1 = tracer.scores(1), tracer.scores(1, method="top1")
    assert torch.equal(plain.indices["res"], top1.indices["res"])
    assert torch.allclose(plain.scores["res"], top1.scores["res"], atol=1e-6)


def test_a_registered_method_traces_classifies_and_maps(toy_method, tmp_path):
    bank = random_bank(range(4), d_sae=48, d_model=64, arch="jumprelu")
    tracer = ff.FlowTracer(bank, contexts=None)
    graph = tracer.trace("2/res/5", method="lowest", t_res=-1.0, t_module=-1.0, direction="backward")
    for edge in graph.edges:                  # every edge is the lowest-cosine pair, scored by its cosine
        src, dst = edge.src, edge.dst
        cos = bank.decoder(dst.site, dst.layer)[dst.index] @ bank.decoder(src.site, src.layer).T
        assert src.index == int(cos.argmin()) and edge.score == pytest.approx(float(cos.min()), abs=1e-5)
    assert graph.span == (0, 2) and len(graph.edges) == 2 + 2 * 3            # res chain + mlp/att at layers 0-2
    assert (tracer.classify(2, 0.5, method="lowest").scores.s("res") < 0).all()      # lowest cosines are negative
    fmap = tracer.flow_map(tmp_path / "map", method="lowest", progress=False)
    assert torch.equal(fmap[2].indices["att"], tracer.scores(2, method="lowest").indices["att"])
    assert ff.FlowMap.load(tmp_path / "map").meta["method"] == "lowest"
    with pytest.raises(ff.FeatureFlowError, match="another bank or settings"):   # a cosine map is not resumed
        tracer.flow_map(tmp_path / "map", progress=False)


def test_tracing_refuses_a_method_that_needs_text():
    tracer = ff.FlowTracer(planted_chain_bank()[0], contexts=None)
    for call in (lambda: tracer.trace("2/res/1", method="pearson"), lambda: tracer.scores(2, method="exhaustive"),
                 lambda: tracer.flow_map(method="attribution", progress=False)):
        with pytest.raises(ff.InvalidArgumentError, match=r"needs .*tracing and the flow map take a data-free method "
                                                          r"\(\['top1', 'top5', 'random', 'permutation'"):
            call()
    with pytest.raises(ff.InvalidArgumentError, match="unknown matching method 'nope'"):
        tracer.trace("2/res/1", method="nope")

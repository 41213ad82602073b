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

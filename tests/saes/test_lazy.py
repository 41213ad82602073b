"""Lazy banks (issue 25): SAEs read from disk when needed, at most ``keep`` in memory, the same results."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import tl_featureflow as ff
from tl_featureflow.errors import BankError, InvalidArgumentError, UnknownFeatureError
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.synthetic import planted_chain_bank, random_bank, tiny_model


@pytest.fixture
def saved(tmp_path):
    bank, truth = planted_chain_bank()
    return bank, truth, bank.save(tmp_path / "bank")


def _maps_equal(a, b) -> bool:
    return a.layers == b.layers and all(
        torch.equal(a[layer].scores[s], b[layer].scores[s]) and torch.equal(a[layer].indices[s], b[layer].indices[s])
        for layer in a.layers for s in a[layer].scores) and a.thresholds == b.thresholds


def test_opening_loads_nothing_and_shape_facts_need_no_weights(saved):
    bank, _, path = saved
    lazy = SAEBank.load(path, lazy=True, keep=2)
    assert (lazy.saes.resident, lazy.saes.loads) == (0, 0)
    assert list(lazy) == list(bank) and lazy.layers == bank.layers and lazy.sites == bank.sites
    assert [lazy.d_sae(*key) for key in lazy] == [bank.d_sae(*key) for key in bank]
    assert [lazy.hook(key) for key in lazy] == [bank.hook(key) for key in bank]
    assert lazy.describe() == bank.describe() and lazy.d_model == bank.d_model
    lazy.check_ref("2/res/3")
    sub = lazy.select(layers=[2, 3]).bind(tiny_model())
    assert lazy.saes.loads == 0 and list(sub) == [k for k in bank if k[1] in (2, 3)]
    with pytest.raises(UnknownFeatureError, match="no SAE for"):
        lazy.hook(("res", 9))


def test_a_lazy_flow_map_equals_the_eager_one_with_at_most_keep_saes_in_memory(saved, tmp_path):
    bank, _, path = saved
    eager = ff.FlowTracer(bank, contexts=None).flow_map(tmp_path / "eager", progress=False)
    lazy_bank = SAEBank.load(path, lazy=True, keep=2)
    lazy = ff.FlowTracer(lazy_bank, contexts=None).flow_map(tmp_path / "lazy", progress=False)
    assert _maps_equal(eager, lazy)
    assert lazy_bank.saes.peak == 2 and lazy_bank.saes.loads > len(bank)   # it read SAEs again after releasing them
    assert lazy_bank.fingerprint() == bank.fingerprint()
    assert lazy[2].scores["res"][2, 0] > 0.999     # planted: slot 2 of res 2 is a row of res 1


def test_a_lazy_bank_resumes_an_eager_banks_map_without_reading_a_decoder(saved, tmp_path):
    bank, _, path = saved
    out = tmp_path / "map"
    eager = ff.FlowTracer(bank, contexts=None).flow_map(out, progress=False)
    lazy_bank = SAEBank.load(path, lazy=True, keep=1)
    resumed = ff.FlowTracer(lazy_bank, contexts=None).flow_map(out, progress=False)
    assert _maps_equal(resumed, eager) and lazy_bank.saes.loads <= 1     # same fingerprint: every layer resumed


def test_lazy_validation_gives_the_eager_rows(tmp_path):
    model = tiny_model(gated=True)
    bank = random_bank(range(4), d_sae=32, d_model=64, arch="jumprelu")
    lazy = SAEBank.load(bank.save(tmp_path / "bank"), lazy=True, keep=4)
    tokens = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    kwargs = dict(layers=[2], methods=["top1", "exhaustive_single", "attribution"], positions_per_text=3, seed=1,
                  progress=False)
    rows = ff.FlowTracer(bank, model, contexts=None).validate(tokens, **kwargs).rows
    lazy_rows = ff.FlowTracer(lazy, model, contexts=None).validate(tokens, **kwargs).rows
    assert rows and lazy_rows == rows and lazy.saes.peak <= 4


def test_a_lazy_bank_saves_to_the_same_bank_and_moves_later_loads(saved, tmp_path):
    bank, _, path = saved
    lazy = SAEBank.load(path, lazy=True, keep=1)
    again = SAEBank.load(lazy.save(tmp_path / "copy"))
    assert again.fingerprint() == bank.fingerprint()
    lazy.to(dtype=torch.float64)
    assert lazy[("res", 1)].W_dec.dtype == torch.float64 and lazy.decoder("res", 2).dtype == torch.float64


def test_bad_keep_and_bad_weights_are_named(saved, tmp_path):
    bank, _, path = saved
    with pytest.raises(InvalidArgumentError, match="keep=0"):
        SAEBank.load(path, lazy=True, keep=0)
    weights = next((path / "res_2").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["W_dec"][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(BankError, match=r"\('res', 2\).*NaN"):
        SAEBank.load(path, lazy=True, verify=False)

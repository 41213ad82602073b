"""A newcomer's first hour (issue 28): nothing trains unasked, bad arguments fail at once, results print short."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow import cli
from tl_featureflow.synthetic import planted_chain_bank, tiny_model


def test_a_bad_feature_fails_before_anything_loads():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tl_featureflow.cli", "trace", "14-res-249"], capture_output=True,
                         text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert out.returncode == 2 and "cannot parse feature '14-res-249'" in out.stderr
    assert seconds < 2.0, f"{seconds:.1f} s: something loaded before the argument was checked"


def test_an_untrained_preset_is_an_error_that_says_how_to_train_it(monkeypatch, tmp_path, capsys):
    """No implicit training: the command names train-saes, --train and the measured cost, and trains nothing."""
    import tl_featureflow.embedded as embedded

    trained = []
    monkeypatch.setattr(cli, "_load_model", lambda args: tiny_model())
    monkeypatch.setattr(embedded, "embedded_bank_dir", lambda preset: tmp_path / preset)   # an empty cache
    monkeypatch.setattr(embedded, "_train_embedded_bank", lambda *a, **k: trained.append(a))
    assert cli.main(["trace", "14/res/249", "--preset", "paper"]) == 1
    err = capsys.readouterr().err
    assert "'paper' bank of the embedded model is not trained yet (about 80 minutes" in err
    assert "featureflow train-saes --preset paper" in err and "--train" in err
    assert not trained


def test_with_train_the_command_trains_the_preset_first(monkeypatch, tmp_path):
    import tl_featureflow.embedded as embedded

    trained = []
    monkeypatch.setattr(cli, "_load_model", lambda args: tiny_model())
    monkeypatch.setattr(embedded, "embedded_bank_dir", lambda preset: tmp_path / preset)

    def train(preset, folder, model, device):
        trained.append(preset)
        raise ff.CacheError("stop here: the training was asked for")

    monkeypatch.setattr(embedded, "_train_embedded_bank", train)
    assert cli.main(["trace", "14/res/249", "--preset", "paper", "--train"]) == 1
    assert trained == ["paper"]


def test_result_objects_print_in_one_short_line():
    model, (bank, _) = tiny_model(), planted_chain_bank()
    tracer = ff.FlowTracer(bank, model, contexts=None)
    tokens = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    objects = [tracer.trace("2/res/1"), tracer.match(("res", 1), ("res", 2)), tracer.flow_map(progress=False),
               ff.validate(tracer, model, tokens, layers=[2], progress=False),
               ff.flow.contexts.collect_top_contexts(model, bank, tokens, progress=False), bank]
    fmap = objects[2]
    objects.append(fmap.layer_scores[2])
    for obj in objects:
        text = repr(obj)
        assert len(text.splitlines()) <= 2 and len(text) < 400, text
        assert type(obj).__name__ in text


def test_a_list_of_saes_makes_a_bank_keyed_by_their_hooks():
    bank, _ = planted_chain_bank()
    again = ff.SAEBank(list(bank.values()))
    assert list(again) == list(bank) and all(again[k] is bank[k] for k in bank)
    with pytest.raises(ff.errors.BankError, match="SAEs 1 and 6 of the list both read \\('res', 1\\)"):
        ff.SAEBank([*bank.values(), bank["res", 1]])
    with pytest.raises(ff.errors.BankError, match="SAE 0 of the list is a int") as caught:
        ff.SAEBank([1])
    assert "HookPoint" not in str(caught.value)

"""Steering sweeps: batched rows equal one-by-one generation; settings, save/load, summary."""

import pytest
import torch
from test_steering import _graph

import tl_featureflow as ff
from tl_featureflow._files import atomic_write_json, read_json
from tl_featureflow.steer.judge import OfflineJudge
from tl_featureflow.steer.steerer import Steerer
from tl_featureflow.steer.sweeps import SteeringSweep, SweepSetting, SweepSettings, steering_sweep, sweep_settings
from tl_featureflow.synthetic import D_VOCAB


def test_settings_grid():
    graph = _graph()
    settings = sweep_settings(graph, [1.0, 2.0], layers=[0, 2])
    assert settings[0] == SweepSetting("baseline", None, 0.0)
    assert len(settings) == 1 + 2 * 2 * 2
    with pytest.raises(ff.FeatureFlowError, match=r"layers \[5\]"):
        sweep_settings(graph, [1.0], layers=[5])
    with pytest.raises(ff.FeatureFlowError, match="unknown mode"):
        sweep_settings(graph, [1.0], modes=["both"])


@pytest.mark.parametrize("op,strengths", [("add", [6.0, -6.0]), ("rescale", [0.0, 3.0])])
def test_batched_rows_equal_one_by_one_and_a_hand_built_steerer(tiny_model, op, strengths, bank_factory):
    bank = bank_factory()
    graph = _graph()
    prompt = torch.randint(0, D_VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(prompt_tokens=prompt, strengths=strengths, op=op, do_sample=False, max_new_tokens=6, progress=False,
                  scale="unit")
    batched = steering_sweep(tiny_model, bank, graph, batch_size=4, **kwargs)
    single = steering_sweep(tiny_model, bank, graph, batched=False, **kwargs)
    assert [r.setting for r in batched.rows] == [r.setting for r in single.rows]
    assert len(batched.rows) == 1 + 2 * 3 * 2 and batched.meta["generate_calls"] == 4
    assert [r.tokens for r in batched.rows] == [r.tokens for r in single.rows]
    # the cumulative row at layer 1 is exactly a Steerer along the graph
    row = next(r for r in batched.rows if r.mode == "cumulative" and r.layer == 1 and r.strength == strengths[0])
    with Steerer(tiny_model, bank, scale="unit").along(graph, strengths[0], mode="cumulative", up_to_layer=1, op=op):
        by_hand = tiny_model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert row.tokens == by_hand[0, 5:].tolist()
    base = batched.baseline()[0]
    plain = tiny_model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert base.tokens == plain[0, 5:].tolist()
    assert any(r.tokens != base.tokens for r in batched.rows)


def test_sampled_sweep_is_reproducible_and_saves(tiny_model, tmp_path, bank_factory):
    bank = bank_factory()
    prompt = torch.randint(0, D_VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt_tokens=prompt, strengths=[3.0], samples=3, max_new_tokens=5, progress=False, seed=7,
                  scale="unit")
    a = steering_sweep(tiny_model, bank, _graph(), **kwargs)
    b = steering_sweep(tiny_model, bank, _graph(), **kwargs)
    assert [r.tokens for r in a.rows] == [r.tokens for r in b.rows]
    path = a.save(tmp_path / "sweep.json")
    again = SteeringSweep.load(path)
    assert [r.tokens for r in again.rows] == [r.tokens for r in a.rows] and again.meta == a.meta
    assert again.settings == a.settings == SweepSettings(strengths=(3.0,), samples=3, max_new_tokens=5, seed=7,
                                                         prompt=None, scale="unit")
    assert read_json(path, "sweep")["schema_version"] == 2
    # a version-1 file (settings inside meta, a `format` string; never released) is refused, naming the file
    old = {"format": "tl_featureflow.steering_sweep/1", "rows": read_json(path, "sweep")["rows"], "meta": a.meta}
    atomic_write_json(tmp_path / "v1.json", old)
    with pytest.raises(ff.CacheError, match="v1.json"):
        SteeringSweep.load(tmp_path / "v1.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ff.CacheError, match="bad.json"):
        SteeringSweep.load(tmp_path / "bad.json")


def test_summary_and_best_with_a_user_judge(tiny_model, bank_factory):
    bank = bank_factory()
    prompt = torch.randint(0, D_VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    sweep = steering_sweep(tiny_model, bank, _graph(), prompt_tokens=prompt, scale="unit", strengths=[1.0, 8.0], samples=2,
                           max_new_tokens=6, progress=False)
    with pytest.raises(ff.FeatureFlowError, match="score"):
        sweep.summary()
    # no tokenizer: the texts are empty, so a user judge scores by the row's strength via a lookup
    strengths = iter([r.strength for r in sweep.rows])
    judge = OfflineJudge(tiny_model, behavioural=lambda texts, topic: [min(next(strengths) / 8.0, 1.0)
                                                                        for _ in texts])
    sweep.score(judge, "anything")
    table = sweep.summary("behavioural")
    assert table[SweepSetting("baseline", None, 0.0)] == 0.0
    assert table[SweepSetting("single", 1, 8.0)] == 1.0
    assert all(0.0 <= r.scores["coherence"] <= 1.0 and r.scores["ppl"] > 1 for r in sweep.rows)
    best, value = sweep.best("behavioural", mode="cumulative")
    assert best.strength == 8.0 and value == 1.0
    assert set(sweep.to_pandas().columns) >= {"mode", "layer", "strength", "score", "coherence"}


def test_settings_validate_and_override(tiny_model, bank_factory):
    with pytest.raises(ff.InvalidArgumentError, match="samples"):
        SweepSettings(samples=0, scale="unit")
    with pytest.raises(ValueError, match="unknown modes"):   # InvalidArgumentError is a ValueError
        SweepSettings(modes=("both",), scale="unit")
    with pytest.raises(ff.InvalidArgumentError, match="unknown settings"):
        steering_sweep(tiny_model, bank_factory(), _graph(), stregths=[1.0])
    # the default prompt has no trailing space (SmolLM2 writes digits after "I think ")
    assert SweepSettings(scale="unit").prompt == "I think"
    settings = SweepSettings(strengths=[2, 4], layers=[1], scale="unit")
    assert settings.strengths == (2.0, 4.0) and settings.layers == (1,)
    assert SweepSettings.from_dict(settings.to_dict()) == settings


def test_a_sweep_says_what_it_will_cost_and_the_probe_changes_nothing(tiny_model, bank_factory, capsys):
    bank = bank_factory()
    prompt = torch.randint(0, D_VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt_tokens=prompt, strengths=[3.0], samples=3, max_new_tokens=5, seed=7, scale="unit",
                  batch_size=4)
    quiet = steering_sweep(tiny_model, bank, _graph(), progress=False, **kwargs)
    assert "about" not in capsys.readouterr().out
    loud = steering_sweep(tiny_model, bank, _graph(), progress=True, **kwargs)
    line = [x for x in capsys.readouterr().out.splitlines() if "generate calls" in x]
    rows = len(quiet.rows)
    assert line == [f"steering sweep: {rows} rows of 5 tokens in {-(-rows // 4)} generate calls, "
                    f"about {line[0].split('about ')[1]}"] and line[0].endswith("(from two steps timed now)")
    assert [r.tokens for r in loud.rows] == [r.tokens for r in quiet.rows]     # sampled rows, same seeds

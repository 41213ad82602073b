"""Steering report cards and seed probes: schedules, harmonic mean, instruction relevance, prompting's seed."""

import math
import warnings
from dataclasses import replace

import pytest
import torch
from test_steering import _graph

import tl_featureflow as ff
from tl_featureflow.refs import FeatureRef
from tl_featureflow.steer import probe as probe_module
from tl_featureflow.steer import report_card as rc
from tl_featureflow.steer.judge import OfflineJudge
from tl_featureflow.steer.probe import probe_seeds
from tl_featureflow.steer.report_card import (
    PAPER_METHODS,
    CardSettings,
    Method,
    ReportCard,
    harmonic,
    steering_report_card,
)
from tl_featureflow.steer.sweeps import GeneratedRows
from tl_featureflow.steer.themes import Theme


def test_harmonic_mean_by_hand():
    torch.testing.assert_close(harmonic([0.5, 1.0, 0.2], [1.0, 1.0, 0.0], [0.25, 1.0, 0.9]),
                               torch.tensor([3 / (2 + 1 + 4), 1.0, 0.0]))


def test_methods_give_the_papers_coefficients_layer_by_layer():
    graph = _graph()                     # seed 1/res/2; nodes at layers 0, 1 (res + mlp), 2; span (0, 2)
    by_name = {m.name: m for m in PAPER_METHODS}
    assert by_name["single exponential"].alpha == -0.05 and by_name["cumulative exponential"].alpha == -0.25
    assert rc._edits(by_name["feature"], graph, 1, 3.0) == {FeatureRef(1, "res", 2): 3.0}
    # exponential, cumulative: the paper's s = strength * exp(0.25 * seed layer); coefficient s * exp(-0.25 * l)
    expo = rc._edits(by_name["cumulative exponential"], graph, 2, 3.0)
    s = 3.0 * math.exp(0.25 * 1)
    assert by_name["cumulative exponential"].paper_strength(3.0, 1) == pytest.approx(s)
    for ref, coef in expo.items():
        assert coef == pytest.approx(s * math.exp(-0.25 * ref.layer))
    assert expo[FeatureRef(1, "res", 2)] == pytest.approx(3.0)          # the strength at the seed's layer
    assert len(expo) == 4
    # linear, cumulative: s at the span's first layer, 1 at its last
    lin = rc._edits(by_name["cumulative linear"], graph, 2, 5.0)
    assert [lin[FeatureRef(lay, "res", i)] for lay, i in ((0, 1), (1, 2), (2, 3))] == pytest.approx([5.0, 3.0, 1.0])
    # single-layer: only the features at that layer, constant
    assert rc._edits(by_name["single constant"], graph, 1, 2.0) == {FeatureRef(1, "mlp", 4): 2.0,
                                                                     FeatureRef(1, "res", 2): 2.0}
    single_expo = rc._edits(by_name["single exponential"], graph, 2, 2.0)
    assert single_expo == {FeatureRef(2, "res", 3): pytest.approx(2.0 * math.exp(-0.05 * (2 - 1)))}


class _Embedder:
    """Planted embeddings: each text maps to a given vector."""

    def __init__(self, table):
        self.table = table

    def encode(self, texts):
        return torch.stack([torch.nn.functional.normalize(torch.as_tensor(self.table[t], dtype=torch.float32), dim=0)
                            for t in texts])


def test_instruction_relevance_is_calibrated_on_unsteered_responses():
    instructions = ["a", "b"]
    # unsteered answers sit on their own instruction's axis; a steered answer halfway; an off one on neither
    table = {"a": [1, 0, 0], "b": [0, 1, 0], "ua": [1, 0, 0], "ub": [0, 1, 0], "half": [1, 1, 0], "off": [0, 0, 1]}
    judge = OfflineJudge(embedder=_Embedder(table))
    plan = rc._Plan

    def block(j, texts):
        plans = [plan("unsteered", None, None, j, 0, {})] + [plan("feature", 1, 1.0, j, k, {}) for k in range(2)]
        return {"plans": plans, "rows": [([], t) for t in texts],
                "scores": {"concept": torch.ones(3), "fluency": torch.full((3,), 0.5)}}

    blocks = [block(1, ["ua", "half", "off"]), block(2, ["ub", "ub", "ua"])]
    anchors = rc._instruction(judge, instructions, blocks)
    assert anchors == {"other_instructions": 0.0, "own_instruction": 1.0}
    torch.testing.assert_close(blocks[0]["scores"]["instruction"], torch.tensor([1.0, 2 ** -0.5, 0.0]))
    torch.testing.assert_close(blocks[1]["scores"]["instruction"], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(blocks[0]["scores"]["harmonic"],
                               torch.tensor([3 / (1 + 2 + 1), 3 / (1 + 2 + 2 ** 0.5), 0.0]))
    # unsteered answers no closer to their own instruction: NaN with a warning, never a made-up number
    table.update({"ua": [0, 0, 1], "ub": [0, 0, 1]})
    blocks = [block(1, ["ua", "half", "off"]), block(2, ["ub", "ub", "ua"])]
    with pytest.warns(UserWarning, match="instruction relevance"):
        rc._instruction(judge, instructions, blocks)
    assert torch.isnan(blocks[0]["scores"]["harmonic"]).all()


class _HashEmbedder:
    def encode(self, texts):
        return torch.stack([torch.nn.functional.normalize(
            torch.randn(8, generator=torch.Generator().manual_seed(hash(t) % 2 ** 31)), dim=0) for t in texts])


def test_report_card_prompting_shares_seeds_and_judge(text_model_factory, monkeypatch, tmp_path, bank_factory,
                                                     capsys):
    model = text_model_factory()
    bank = bank_factory()
    graph = _graph()
    theme = Theme("tea", "tea and biscuits", ("tea",))
    topics = []

    def behavioural(texts, topic):
        topics.append(topic)
        return [(len(t) % 7) / 6 for t in texts]

    judge = OfflineJudge(model, embedder=_HashEmbedder(), behavioural=behavioural)
    calls = []
    real = rc.generate_rows

    def spy(model, bank, prompt_ids, edits, settings, **kw):
        calls.append((kw["desc"], kw["seed_offset"], prompt_ids[0].tolist(), len(edits)))
        return real(model, bank, prompt_ids, edits, settings, **kw)

    monkeypatch.setattr(rc, "generate_rows", spy)
    settings = CardSettings(prompt="hi", neutral_prompts=("one", "two"), strengths=(1.0, 4.0), samples=3,
                            select_samples=2, neutral_samples=2, max_new_tokens=4, batch_size=8, scale="unit",
                            methods=(Method("feature", "feature"), Method("cumulative linear", "cumulative", "linear")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # random embeddings: instruction relevance may not calibrate
        card = steering_report_card(model, bank, graph, theme, judge=judge, settings=settings, progress=True)
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("report card for tea:")]
    n_rows = len(card.generations) + (1 + len(card.meta["selection"])) * settings.select_samples
    assert len(said) == 1 and said[0].startswith(f"report card for tea: {n_rows} generations of up to 4 tokens, about")
    assert set(topics) == {"tea and biscuits"}   # one judge, one topic, for every row (prompting included)
    # prompting runs on its own prompt (asking for the topic) with the same sampling seed as the other rows
    measured = [c for c in calls if "choosing" not in c[0]]
    assert len(measured) == 2 * 3                 # the paper's prompt and 2 neutral ones, each + prompting
    for j, (steered, asked) in enumerate(zip(measured[::2], measured[1::2], strict=True)):
        assert "prompting" in asked[0] and steered[1] == asked[1] == 1000 * (j + 1)
        asked_text = model.tokenizer.decode(asked[2])
        assert asked_text.endswith("Talk about tea. hi" if j == 0 else "Talk about tea in your answer.")
    # the prompting rows are exactly an unsteered generate of the asked prompt under that seed
    ask = model.to_tokens("Talk about tea. hi")
    torch.manual_seed(settings.seed + 1000)
    out = model.generate(ask.expand(3, -1), max_new_tokens=4, do_sample=True, top_p=0.7, temperature=1.27,
                         stop_at_eos=True, verbose=False)
    expected = [model.tokenizer.decode(t[:t.index(model.tokenizer.eos_token_id) + 1] if
                                       model.tokenizer.eos_token_id in t else t, skip_special_tokens=True)
                for t in out[:, ask.shape[1]:].tolist()]
    assert [g["text"] for g in card.generations if g["method"] == "prompting" and g["prompt"] == 0] == expected
    # each method's chosen setting is the best of its selection grid
    for name in ("feature", "cumulative linear"):
        grid = [s for s in card.meta["selection"] if s["method"] == name]
        best = max(grid, key=lambda s: s["score"])
        assert card.row(name).selection_score == pytest.approx(best["score"], abs=1e-4)
    assert [r.method for r in card.rows] == ["unsteered", "prompting", "feature", "cumulative linear"]
    assert card.row("feature").n == 3 and card.row("feature").neutral_n == 4
    assert card.row("feature").concept == pytest.approx(
        sum(g["concept"] for g in card.generations if g["method"] == "feature" and g["prompt"] == 0) / 3)
    path = card.save(tmp_path / "card.json")
    again = ReportCard.load(path)
    assert again.to_markdown() == card.to_markdown() and again.settings == card.settings
    assert "prompting" in card.verdict() and card.to_markdown().count("\n") == 5
    with pytest.raises(ff.FeatureFlowError, match="no method"):
        card.row("nope")
    with pytest.raises(ff.InvalidArgumentError, match="unknown settings"):
        steering_report_card(model, bank, graph, theme, judge=judge, strenghts=(1.0,))
    with pytest.raises(ff.InvalidArgumentError, match="2 neutral prompts"):
        CardSettings(neutral_prompts=("only one",))


def test_probe_ranks_candidates_by_what_steering_them_does(tiny_model, monkeypatch, bank_factory):
    bank = bank_factory()
    good = FeatureRef(1, "res", 5)

    def fake_rows(model, bank, ids, edits, settings, **kw):   # a row steered by `good` comes out on topic
        assert settings.seed == 3 and kw["scale"] == "unit"
        return GeneratedRows([([1], "on" if good in e else "off") for e in edits], None, 1)

    monkeypatch.setattr(probe_module, "generate_rows", fake_rows)
    probes = probe_seeds(tiny_model, bank, ["0/res/1", good, "2/res/3"], "topic", judge=None, scale="unit",
                         score_fn=lambda texts, topic: [float(t == "on") for t in texts], samples=3, seed=3,
                         prompt_tokens=torch.tensor([1, 2]), progress=False)
    assert [p.ref for p in probes][0] == good and probes[0].score == 1.0 and probes[0].samples == 3
    assert [p.score for p in probes[1:]] == [0.0, 0.0]
    with pytest.raises(ff.InvalidArgumentError, match="judge"):
        probe_seeds(tiny_model, bank, [good], "topic", judge=None, prompt_tokens=torch.tensor([1]))
    with pytest.raises(ff.FeatureFlowError, match="at least one"):
        probe_seeds(tiny_model, bank, [], "topic", judge=None, score_fn=lambda t, x: [])


def test_the_demo_steers_in_typical_units_when_every_feature_fired(bank_factory):
    from tl_featureflow.demo import _steering_scale

    graph = _graph()

    class Contexts:                      # typical activation = the median read off the contexts' histogram
        def __init__(self, dead=()):
            self.dead = set(dead)

        def __contains__(self, key):
            return True

        def quantile(self, ref, q):
            return 0.0 if ref in self.dead else 2.5

    assert _steering_scale({"t": graph}, Contexts(), bank_factory(arch="jumprelu")) == "typical"
    dead = Contexts(dead=[FeatureRef(2, "res", 3)])
    assert _steering_scale({"t": graph}, dead, bank_factory(arch="jumprelu")) == "threshold"
    assert _steering_scale({"t": graph}, dead, bank_factory()) == "unit"


def test_quick_card_starts_from_quick_settings(text_model_factory, monkeypatch, bank_factory):
    model, bank, graph = text_model_factory(), bank_factory(), _graph()
    theme = Theme("tea", "tea and biscuits", ("tea",))
    judge = OfflineJudge(model, embedder=_HashEmbedder(), behavioural=lambda texts, topic: [0.0] * len(texts))
    seen = []

    class Stop(Exception):
        pass

    def spy(method, graph, layers, settings):          # the selection grid sees the card's settings
        seen.append(settings)
        raise Stop

    monkeypatch.setattr(rc, "_grid", spy)
    with pytest.raises(Stop):
        steering_report_card(model, bank, graph, theme, judge=judge, quick=True, progress=False, samples=2)
    assert seen[0] == replace(rc.QUICK_SETTINGS, samples=2)      # quick, then the keyword override
    assert seen[0].strengths == (4.0,) and seen[0].max_new_tokens < CardSettings().max_new_tokens
    with pytest.raises(ff.InvalidArgumentError, match="both quick=True and settings"):
        steering_report_card(model, bank, graph, theme, judge=judge, quick=True, settings=CardSettings())

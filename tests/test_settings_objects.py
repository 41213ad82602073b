"""Settings objects beside the keywords: validate / probe_seeds / theme_features (issue 23)."""

from dataclasses import asdict

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.causal.experiment import ValidationSettings, validate
from tl_featureflow.steer import probe as probe_module
from tl_featureflow.steer import themes
from tl_featureflow.steer.probe import ProbeSettings, probe_seeds
from tl_featureflow.steer.sweeps import GeneratedRows
from tl_featureflow.steer.themes import ThemeSettings


def test_the_wings_export_the_settings_classes_and_the_top_level_does_not():
    assert ff.causal.ValidationSettings is ValidationSettings
    assert ff.steer.ProbeSettings is ProbeSettings and ff.steer.ThemeSettings is ThemeSettings
    assert "ValidationSettings" in dir(ff.causal)
    assert not hasattr(ff, "ValidationSettings") or "ValidationSettings" not in ff.__all__


def _rows(report):
    return [asdict(r) for r in report.rows]


def test_validate_with_settings_equals_the_same_keywords_and_a_keyword_overrides(tiny_model, bank_factory):
    bank = bank_factory()
    tracer = ff.FlowTracer(bank, tiny_model)
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    kw = dict(methods=("top1", "random"), r=(0.0, 0.5), positions_per_text=3, max_targets=4, seed=2)
    by_kw = validate(tracer, tiny_model, tokens, layers=[1], progress=False, **kw)
    settings = ValidationSettings(**kw)
    by_settings = validate(tracer, tiny_model, tokens, layers=[1], settings=settings, progress=False)
    assert _rows(by_kw) == _rows(by_settings) and by_kw.meta == by_settings.meta
    assert by_kw.group_counts == by_settings.group_counts
    # through the tracer too
    assert _rows(tracer.validate(tokens, layers=[1], settings=settings, progress=False)) == _rows(by_kw)
    # an explicit keyword wins over the settings' field
    overridden = validate(tracer, tiny_model, tokens, layers=[1], settings=settings, seed=5, methods=("top1",),
                          progress=False)
    plain = validate(tracer, tiny_model, tokens, layers=[1], progress=False, **{**kw, "seed": 5,
                                                                               "methods": ("top1",)})
    assert overridden.meta["seed"] == 5 and overridden.meta["methods"] == ["top1"]
    assert _rows(overridden) == _rows(plain)
    with pytest.raises(ff.InvalidArgumentError, match="ValidationSettings"):
        validate(tracer, tiny_model, tokens, layers=[1], settings={"seed": 1}, progress=False)


@pytest.mark.parametrize("cls, field, value", [
    (ValidationSettings, "max_targets", 0), (ValidationSettings, "positions_per_text", 1.5),
    (ValidationSettings, "seed", -1), (ValidationSettings, "batch_rows", 0), (ValidationSettings, "loss_samples", -2),
    (ValidationSettings, "r", float("nan")), (ValidationSettings, "r", ()), (ValidationSettings, "methods", "top1"),
    (ValidationSettings, "methods", ("nope",)), (ValidationSettings, "sweep_methods", ("nope",)),
    (ProbeSettings, "samples", 0), (ProbeSettings, "strength", float("inf")), (ProbeSettings, "max_new_tokens", 0),
    (ProbeSettings, "batch_size", True), (ProbeSettings, "seed", -1), (ProbeSettings, "scale", {"a": 1.0}),
    (ProbeSettings, "prompt", None),
    (ThemeSettings, "k", 0), (ThemeSettings, "site", "resid"), (ThemeSettings, "min_share", 1.5),
    (ThemeSettings, "max_neutral_ratio", -0.1), (ThemeSettings, "pool", 0), (ThemeSettings, "n_contexts", -1),
    (ThemeSettings, "neutral", ()), (ThemeSettings, "neutral", "one text"),
])
def test_bad_field_values_are_feature_flow_errors_naming_the_field(cls, field, value):
    with pytest.raises(ff.FeatureFlowError, match=field):
        cls(**{field: value})


def test_probe_seeds_with_settings_equals_the_same_keywords_and_a_keyword_overrides(tiny_model, bank_factory,
                                                                                     monkeypatch):
    bank = bank_factory()
    seen = []

    def fake_rows(model, bank, ids, edits, settings, **kw):
        seen.append((settings, kw["scale"], len(edits)))
        return GeneratedRows([([1], f"{i % 3}") for i, _ in enumerate(edits)], None, 1)

    monkeypatch.setattr(probe_module, "generate_rows", fake_rows)
    score = lambda texts, topic: [float(t == "1") for t in texts]  # noqa: E731
    common = dict(judge=None, score_fn=score, prompt_tokens=torch.tensor([1, 2]), progress=False)
    refs = ["0/res/1", "1/res/5"]
    kw = dict(strength=8.0, samples=2, scale="unit", max_new_tokens=5, seed=3, batch_size=4)
    by_kw = probe_seeds(tiny_model, bank, refs, "topic", **common, **kw)
    by_settings = probe_seeds(tiny_model, bank, refs, "topic", settings=ProbeSettings(**kw), **common)
    assert by_kw == by_settings and seen[0] == seen[1]
    probe_seeds(tiny_model, bank, refs, "topic", settings=ProbeSettings(**kw), seed=9, **common)
    assert seen[2][0].seed == 9 and seen[2][0].max_new_tokens == 5


def test_theme_features_with_settings_equals_the_same_keywords_and_a_keyword_overrides(monkeypatch):
    def fake(model, bank, texts, site, layer, device=None):
        acts = torch.zeros(len(texts), 2, 8)
        if texts[0] not in themes.NEUTRAL_TEXTS:
            acts[:, :, 3], acts[:, :, 2], acts[:, :, 1] = 4.0, 2.0, 1.0
        return list(acts)

    monkeypatch.setattr(themes, "feature_activations", fake)
    kw = dict(site="mlp", k=2, min_share=0.25)
    by_kw = themes.theme_features(None, None, ["a", "b"], layer=4, **kw)
    by_settings = themes.theme_features(None, None, ["a", "b"], layer=4, settings=ThemeSettings(**kw))
    assert by_kw == by_settings and [f.ref.site for f in by_kw] == ["mlp", "mlp"]
    overridden = themes.theme_features(None, None, ["a", "b"], layer=4, settings=ThemeSettings(**kw), k=3)
    assert [f.ref.index for f in overridden] == [3, 2, 1]

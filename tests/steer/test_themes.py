"""Theme seed features: the contrast picks the selective feature, not dense or one-off ones."""

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.refs import FeatureRef
from tl_featureflow.steer import themes


def test_theme_features_pick_the_selective_feature(monkeypatch):
    theme_texts = ["a", "b", "c"]

    def fake(model, bank, texts, site, layer, device=None):
        out = []
        for text in texts:
            acts = torch.zeros(2, 8)
            if text in themes.NEUTRAL_TEXTS:
                acts[:, 5] = 9.0                   # dense: fires on everything
                acts[:, 2] = 0.3
            else:
                acts[:, 5] = 10.0
                acts[:, 3] = 4.0                   # the theme feature
                acts[:, 2] = 2.0                   # weaker theme feature, a little on neutral text
                if text == "a":
                    acts[0, 7] = 50.0              # one token of one text
            out.append(acts)
        return out

    monkeypatch.setattr(themes, "feature_activations", fake)
    picked = themes.theme_features(None, None, theme_texts, layer=4, k=3)
    assert [f.ref for f in picked] == [FeatureRef(4, "res", 3), FeatureRef(4, "res", 2)]
    assert picked[0].score == pytest.approx(4.0) and picked[0].neutral_mean == 0.0
    assert picked[1].score == pytest.approx(1.7)
    with pytest.raises(ff.FeatureFlowError, match="at least one theme text"):
        themes.theme_features(None, None, [], layer=4)


def test_candidates_show_their_contexts_and_on_theme_ones_come_first(monkeypatch):
    def fake(model, bank, texts, site, layer, device=None):
        acts = torch.zeros(len(texts), 2, 8)
        if texts[0] not in themes.NEUTRAL_TEXTS:
            acts[:, :, 3], acts[:, :, 2] = 4.0, 2.0      # 3 separates the texts best, 2 less so
        return list(acts)

    class Contexts:
        def __contains__(self, key):
            return True

        def examples(self, ref, tokenizer=None, window=8):
            text = {3: "the [stock] market fell", 2: "they prayed to [God] in church"}.get(ref.index, "x")
            return [type("E", (), {"text": text})()] * 4

        def highlighted(self, ref, tokenizer=None, left=8, right=8):   # token pieces, no marks
            pieces = {3: ["the", " stock", " market"], 2: ["pray", " to", " God", ": ", "items", "[0]"]}
            return [type("H", (), {"pieces": pieces.get(ref.index, ["x"])})()] * 4

    class Judge:   # sees the plain contexts: real brackets kept, no marks added
        def similarity(self, texts, topic):
            return torch.tensor([1.0 if t == "pray to God: items[0]" else 0.0 for t in texts])

    monkeypatch.setattr(themes, "feature_activations", fake)
    plain = themes.theme_features(None, None, ["a", "b"], layer=4, k=2, contexts=Contexts())
    assert [f.ref.index for f in plain] == [3, 2] and plain[0].contexts == ("the [stock] market fell",) * 3
    ranked = themes.theme_features(None, None, ["a", "b"], layer=4, k=2, contexts=Contexts(), judge=Judge(),
                                   topic="religion")
    assert [f.ref.index for f in ranked] == [2, 3] and ranked[0].on_theme == 1.0 and ranked[1].on_theme == 0.0


def test_builtin_themes_have_texts_and_descriptions():
    assert {"religion", "war", "love", "programming"} <= set(themes.THEMES)
    for theme in themes.THEMES.values():
        assert len(theme.texts) >= 5 and theme.description

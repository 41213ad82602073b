import pytest
import torch

import tl_featureflow as ff
from conftest import D_VOCAB, make_bank
from tl_featureflow import FlowTracer, FlowTransformer, TopContexts, collect_top_contexts


@pytest.fixture
def corpus():
    return torch.randint(0, D_VOCAB, (7, 10), generator=torch.Generator().manual_seed(3))


def test_streaming_top_contexts_equal_brute_force(tiny_model, corpus, tmp_path):
    bank = make_bank(layers=[0, 2])
    contexts = collect_top_contexts(tiny_model, bank, corpus, n=4, batch_size=2, progress=False)
    _, feats = FlowTransformer.from_hooked(tiny_model).run_with_features(corpus, bank=bank)
    for key in bank:
        acts = feats[key][:, 1:]                       # position 0 skipped
        flat = acts.reshape(-1, acts.shape[-1]).T      # [d_sae, docs * (seq - 1)]
        top = flat.topk(4, dim=1)
        fired = top.values > 0
        torch.testing.assert_close(contexts.values[key], torch.where(fired, top.values, 0.0), rtol=1e-5, atol=1e-5)
        docs, pos = top.indices // 9, top.indices % 9 + 1
        assert torch.equal(contexts.doc[key][fired], docs[fired]) and torch.equal(contexts.pos[key][fired], pos[fired])
        assert bool((contexts.doc[key][~fired] == -1).all())
    ref = ff.FeatureRef(2, "mlp", 5)
    examples = contexts.examples(ref, window=2)
    assert [e.activation for e in examples] == [v for v in contexts.values[ref.key][5].tolist() if v > 0]
    first = examples[0]
    assert f"[<{int(corpus[first.doc, first.pos])}>]" in first.text

    saved = contexts.save(tmp_path / "ctx")
    again = TopContexts.load(saved)
    assert again.meta == contexts.meta and torch.equal(again.tokens, corpus)
    assert all(torch.equal(again.values[k], contexts.values[k]) for k in bank)

    # the cache is reused for the same bank and tokens, and not for others
    cached = collect_top_contexts(tiny_model, bank, corpus, n=4, batch_size=3, path=saved, progress=False)
    assert all(torch.equal(cached.values[k], contexts.values[k]) for k in bank)
    other = collect_top_contexts(tiny_model, bank, corpus[:3], n=4, path=saved, progress=False)
    assert other.tokens.shape[0] == 3 and TopContexts.load(saved).tokens.shape[0] == 3

    graph = FlowTracer(bank, contexts=contexts).trace("2/res/0", t_res=-1, t_module=-1)
    assert any("[" in (node.label or "") for node in graph.nodes)


def test_bad_tokens_are_refused(tiny_model):
    with pytest.raises(ff.FeatureFlowError, match="integer tensor"):
        collect_top_contexts(tiny_model, make_bank(layers=[0]), torch.zeros(3, 4), progress=False)
    with pytest.raises(ff.InvalidArgumentError, match="outside the vocabulary"):
        collect_top_contexts(tiny_model, make_bank(layers=[0]), torch.full((3, 4), 10_000), progress=False)

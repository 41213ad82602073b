"""The embedding SAE (issue 27): an SAE on ``blocks.0.hook_resid_pre`` is ``("res", -1)``, layer 0's res predecessor.

Planted: the embedding SAE's row 2 is exactly the decoder row of layer 0's res feature 5, so matching must name
``-1/res/2`` as that feature's top-1 predecessor with cosine 1, a trace from ``0/res/5`` must reach it, and
deactivating it at ``blocks.0.hook_resid_pre`` must change ``0/res/5`` as a hand-written forward says.
"""

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow import FeatureRef, FlowGraph, FlowTracer, SAEBank
from tl_featureflow.causal.interventions import Intervention, target_activations
from tl_featureflow.flow.cards import build_card
from tl_featureflow.refs import hook_name
from tl_featureflow.synthetic import sae_from_decoder, tiny_model

D, WIDTH, EMB, TARGET = 64, 16, 2, 5


@pytest.fixture(scope="module")
def embed_bank():
    gen = torch.Generator().manual_seed(7)
    rows = {key: torch.nn.functional.normalize(torch.randn(WIDTH, D, generator=gen), dim=1)
            for key in [("res", -1), ("res", 0), ("mlp", 0), ("res", 1)]}
    rows[("res", 0)][TARGET] = rows[("res", -1)][EMB]
    rows[("res", 1)][3] = rows[("res", 0)][TARGET]                      # the chain goes on to layer 1
    return SAEBank([sae_from_decoder(site, layer, W) for (site, layer), W in rows.items()])


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=2, d_model=D)


def test_a_list_with_an_sae_on_blocks_0_resid_pre_keys_it_res_minus_1(embed_bank):
    assert list(embed_bank) == [("res", -1), ("res", 0), ("mlp", 0), ("res", 1)]
    assert embed_bank.layers == [-1, 0, 1] and embed_bank.hook(("res", -1)) == "blocks.0.hook_resid_pre"
    assert "-1 (embedding), 0-1" in embed_bank.describe()
    assert hook_name("res", -1) == "blocks.0.hook_resid_pre"
    assert SAEBank({("res", -1): embed_bank["res", -1]}).describe() == "res at layers -1 (embedding) (1 SAEs)"
    with pytest.raises(ff.errors.BankError, match="res site only"):
        SAEBank({("mlp", -1): embed_bank["res", -1]})
    with pytest.raises(ff.errors.BankError, match="non-negative int"):
        SAEBank({("res", -2): embed_bank["res", -1]})
    with pytest.raises(ff.errors.BankError, match=r"reads hook 'blocks\.0\.hook_resid_post'.*'blocks\.0\.hook_resid_pre'"):
        SAEBank({("res", -1): embed_bank["res", 0]})


def test_feature_refs_of_the_embedding_round_trip():
    ref = FeatureRef.parse("-1/res/2")
    assert ref == FeatureRef(-1, "res", 2) and str(ref) == "-1/res/2" and FeatureRef.parse(str(ref)) == ref
    assert ref.hook_name == "blocks.0.hook_resid_pre" and sorted([FeatureRef(0, "att", 0), ref])[0] == ref
    for bad in ["-1/mlp/2", "-1/att/0", "-2/res/0"]:
        with pytest.raises(ff.FeatureFlowError):
            FeatureRef.parse(bad)


def test_the_embedding_sae_is_the_top1_res_predecessor_of_layer_0(embed_bank):
    tracer = FlowTracer(embed_bank)
    assert tracer.predecessor_keys(0) == {"res": ("res", -1), "mlp": ("mlp", 0)}
    assert tracer.predecessor_keys(-1) == {}
    preds = tracer.predecessors("0/res/5")
    assert preds["res"][0][0] == FeatureRef(-1, "res", EMB) and preds.s("res") == pytest.approx(1.0, abs=1e-6)
    scores = tracer.scores(0)
    assert int(scores.indices["res"][TARGET, 0]) == EMB
    assert tracer.successors("-1/res/2")[0][0] == FeatureRef(0, "res", TARGET)
    fmap = tracer.flow_map(progress=False)
    assert fmap.layers == [0, 1] and int(fmap[0].indices["res"][TARGET, 0]) == EMB   # -1: no target layer
    with pytest.raises(ff.InvalidArgumentError, match="embedding"):
        tracer.classify(-1)
    with pytest.raises(ff.InvalidArgumentError, match="embedding"):
        tracer.scores(-1)


def test_a_trace_from_layer_0_reaches_the_embedding(embed_bank, tmp_path):
    tracer = FlowTracer(embed_bank)
    graph = tracer.trace("0/res/5")
    assert graph.chain == [FeatureRef(-1, "res", EMB), FeatureRef(0, "res", TARGET), FeatureRef(1, "res", 3)]
    assert graph.span == (-1, 1) and graph.node("-1/res/2").role == "chain"
    assert graph.node("-1/res/2").s_res is None                   # the embedding has no predecessors
    assert FlowGraph.load(graph.save(tmp_path / "g.json")) == graph
    assert FlowGraph.load(graph.save(tmp_path / "n.json", format="neuronpedia")) == graph
    numbers = [n["feature"] for n in graph.to_neuronpedia()["nodes"]]
    assert len(set(numbers)) == len(numbers) and min(numbers) < 0
    card = build_card("0/res/5", tracer=tracer)
    assert card.predecessors["res"][0][0] == FeatureRef(-1, "res", EMB) and card.scores["res"] == pytest.approx(1.0)
    embedding = build_card("-1/res/2", tracer=tracer)
    assert embedding.predecessors == {} and embedding.successors[0][0] == FeatureRef(0, "res", TARGET)
    assert build_card("0/mlp/0", tracer=tracer).predecessors["res"][0][0].layer == -1


def test_attach_splices_the_embedding_sae_at_blocks_0_resid_pre(embed_bank, model):
    tokens = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    clean = model(tokens)
    with model.attached(embed_bank):
        logits, feats = model.run_with_features(tokens)
        assert torch.equal(logits, clean)
        _, only = model.run_with_features(tokens, layers=[-1], return_logits=False)
    h = model(tokens, stop_at_layer=0)
    torch.testing.assert_close(feats["res", -1], embed_bank["res", -1].encode(h))
    torch.testing.assert_close(only["res", -1], feats["res", -1])


@torch.no_grad()
def test_deactivating_an_embedding_feature_changes_layer_0_as_by_hand(embed_bank, model):
    tokens = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    emb, target = embed_bank["res", -1], embed_bank["res", 0]
    h = model(tokens, stop_at_layer=0)                               # what blocks.0.hook_resid_pre carries
    a = emb.encode(h)[0, :, EMB]
    clean_by_hand = target.encode(model(h, start_at_layer=0, stop_at_layer=1))[0, :, TARGET]
    pos = int(((a > 0) * clean_by_hand).argmax())                    # both the embedding feature and the target fire
    assert float(a[pos]) > 0 and float(clean_by_hand[pos]) > 0
    edited = h.clone()
    edited[0, pos] -= a[pos] * emb.W_dec[EMB]                        # h + (r - 1) a v with r = 0, at one token
    by_hand = float(target.encode(model(edited, start_at_layer=0, stop_at_layer=1))[0, pos, TARGET])
    assert by_hand < float(clean_by_hand[pos]) - 1e-3                # removing it lowers the target
    item = [Intervention("res", -1, (EMB,), (pos,), 0.0)]
    for layer_local in (True, False):                                # layer 0 alone, and a full forward with hooks
        got = target_activations(model, embed_bank, tokens, 0, [(pos, TARGET)], [item], layer_local=layer_local)
        assert float(got[0]) == pytest.approx(by_hand, abs=1e-5)
    clean = target_activations(model, embed_bank, tokens, 0, [(pos, TARGET)], [[]])
    assert float(clean[0]) == pytest.approx(float(clean_by_hand[pos]), abs=1e-5)


def test_validation_of_layer_0_deactivates_embedding_features(embed_bank, model):
    tokens = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    tracer = FlowTracer(embed_bank, model, contexts=None)
    report = tracer.validate(tokens, layers=[0], methods=["top1", "exhaustive"], max_targets=4, progress=False)
    deactivated = [name for row in report.rows for name in row.deactivated]
    assert any(name.startswith("-1/res/") for name in deactivated)
    assert all(FeatureRef.parse(name).layer in (-1, 0) for name in deactivated)
    with pytest.raises(ff.FeatureFlowError):
        tracer.validate(tokens, layers=[-1], methods=["top1"], progress=False)


def test_save_load_round_trip_of_a_bank_with_the_embedding_sae(embed_bank, tmp_path):
    loaded = SAEBank.load(embed_bank.save(tmp_path / "bank"))
    assert list(loaded) == list(embed_bank) and loaded.fingerprint() == embed_bank.fingerprint()
    assert loaded["res", -1].cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
    torch.testing.assert_close(loaded.decoder("res", -1), embed_bank.decoder("res", -1))
    assert list(loaded.select(layers=[-1, 0])) == [("res", -1), ("res", 0), ("mlp", 0)]

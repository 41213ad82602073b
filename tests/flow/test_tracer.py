"""FlowTracer on planted banks, where every right answer is known exactly."""

import math

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow import FeatureRef, FlowGraph, FlowMap, FlowTracer, SAEBank
from tl_featureflow.flow.flowmap import MAP_INDEX
from tl_featureflow.synthetic import planted_chain_bank, sae_from_decoder

D = 64
WIDTH = 12
A = [0.9, 0.6, 0.3]
CHAIN_INDEX = [3, 7, 1, 5]        # where the chain feature sits in each layer's res SAE


def _sae_with(site: str, layer: int, rows: torch.Tensor):
    return sae_from_decoder(site, layer, rows * (1 + layer))  # non-unit norms: matching must not care


@pytest.fixture
def planted():
    bank, truth = planted_chain_bank(D, WIDTH, cosines=tuple(A))
    assert truth.chain == [f"{layer}/res/{slot}" for layer, slot in enumerate(CHAIN_INDEX)]
    return bank, truth


def test_match_recovers_a_planted_permutation():
    gen = torch.Generator().manual_seed(4)
    rows = torch.nn.functional.normalize(torch.randn(200, D, generator=gen), dim=1)
    perm = torch.randperm(200, generator=gen)
    bank = SAEBank({("res", 0): _sae_with("res", 0, rows),
                    ("res", 1): _sae_with("res", 1, rows[perm] + 0.03 * torch.randn(200, D, generator=gen))})
    tracer = FlowTracer(bank)
    m = tracer.match(("res", 0), ("res", 1))
    assert m.indices.shape == (200, 1) and torch.equal(m.indices[:, 0], perm)
    assert bool((m.scores > 0.9).all())
    top5 = tracer.match(("res", 0), ("res", 1), k=5)
    assert torch.equal(top5.indices[:, 0], perm) and bool((top5.scores[:, :-1] >= top5.scores[:, 1:]).all())
    assert top5[3][0] == (FeatureRef(0, "res", int(perm[3])), pytest.approx(float(m.scores[3, 0])))
    assert tracer.match(("res", 0), ("res", 1)) is m  # cached


def test_predecessors_name_planted_sources(planted):
    bank, _ = planted
    tracer = FlowTracer(bank)
    newborn = tracer.predecessors("2/res/0", k=2)
    assert list(newborn) == ["res", "mlp", "att"]
    assert newborn["mlp"][0][0] == FeatureRef(2, "mlp", 1) and newborn.s("mlp") == pytest.approx(1.0, abs=1e-6)
    assert newborn.s("res") == pytest.approx(0.0, abs=1e-6) and len(newborn["res"]) == 2
    chain = tracer.predecessors(FeatureRef(2, "res", CHAIN_INDEX[2]))
    assert chain["res"][0][0] == FeatureRef(1, "res", CHAIN_INDEX[1]) and chain.s("res") == pytest.approx(A[1], abs=1e-6)
    assert chain["mlp"][0][0] == FeatureRef(2, "mlp", 0) and chain.s("mlp") == pytest.approx(math.sqrt(1 - A[1] ** 2), abs=1e-6)
    first = tracer.predecessors("0/res/3")
    assert dict(first) == {}  # layer 0: no predecessor SAE, not an error
    assert list(tracer.predecessors("1/res/2")) == ["res"]


def test_classify_planted_cases_and_report_thresholds(planted):
    bank, _ = planted
    tracer = FlowTracer(bank)
    bank, truth = planted
    result = tracer.classify(2, thresholds="paper")
    assert result.thresholds == {"res": 0.5, "mlp": 0.15, "att": 0.15} and result.method == "paper"
    assert {ref: result.label(FeatureRef.parse(ref).index) for ref in truth.labels_layer2} == truth.labels_layer2
    assert result.label(CHAIN_INDEX[2]) == "processed"   # s(R)=0.6, s(M)=0.8
    assert result.counts() == {"translated": 2, "processed": 2, "newborn": 1, "unexplained": 7}
    fixed = tracer.classify(2, thresholds={"res": 0.7, "mlp": 0.9, "att": 0.9})
    assert fixed.label(CHAIN_INDEX[2]) == "unexplained" and fixed.method == "fixed"
    assert sum(result.counts().values()) == WIDTH
    assert set(result.features("newborn").tolist()) == {0}


def test_chance_thresholds_separate_aligned_from_unaligned_decoders():
    gen = torch.Generator().manual_seed(9)
    base = torch.nn.functional.normalize(torch.randn(512, D, generator=gen), dim=1)
    aligned = base[torch.randperm(512, generator=gen)] + 0.1 * torch.randn(512, D, generator=gen)
    unrelated = torch.randn(512, D, generator=gen)
    bank = SAEBank({("res", 0): _sae_with("res", 0, base), ("res", 1): _sae_with("res", 1, aligned),
                    ("mlp", 1): _sae_with("mlp", 1, unrelated)})
    tracer = FlowTracer(bank)
    thr = tracer.chance_thresholds(1)
    assert set(thr) == {"res", "mlp"} and 0.2 < thr["res"] < 0.8 and 0.2 < thr["mlp"] < 0.8
    counts = tracer.classify(1).counts()
    assert counts["translated"] >= 500  # aligned res: far above chance
    high_mlp = counts["processed"] + counts["newborn"]
    assert high_mlp <= 0.05 * 512  # unrelated mlp: about 1% by construction


def test_trace_returns_exactly_the_planted_chain(planted):
    bank, chain = planted
    tracer = FlowTracer(bank)
    seed = FeatureRef(1, "res", CHAIN_INDEX[1])
    graph = tracer.trace(seed, t_res=0.5, t_module=0.15)
    # backward: 1 <- 0 at 0.9; forward: 1 -> 2 at 0.6, then 2 -> 3 at 0.3 < 0.5 stops
    assert graph.chain == [FeatureRef(0, "res", 3), seed, FeatureRef(2, "res", CHAIN_INDEX[2])]
    assert graph.span == (0, 2)
    assert graph.modules == [FeatureRef(2, "mlp", 0)]
    scores = {(str(e.src), str(e.dst)): e.score for e in graph.edges}
    assert scores == pytest.approx({("0/res/3", "1/res/7"): 0.9, ("1/res/7", "2/res/1"): 0.6,
                                    ("2/mlp/0", "2/res/1"): math.sqrt(1 - 0.36)}, abs=1e-6)
    assert all(e.src.layer <= e.dst.layer for e in graph.edges)
    assert graph.node(seed).role == "seed" and graph.node(seed).s_res == pytest.approx(0.9, abs=1e-6)
    longer = tracer.trace(seed, t_res=0.25)
    assert longer.span == (0, 3) and longer.chain[-1] == FeatureRef(3, "res", CHAIN_INDEX[3])
    back = tracer.trace(FeatureRef(3, "res", CHAIN_INDEX[3]), t_res=0.25, direction="backward")
    assert back.chain == longer.chain
    assert tracer.trace(seed, direction="forward").span == (1, 2)
    strict = tracer.trace(seed, t_module=0.9)
    assert strict.modules == []


def test_graph_json_round_trip_is_exact(planted, tmp_path):
    bank, _ = planted
    graph = FlowTracer(bank).trace("2/res/9", t_res=0.5)
    again = FlowGraph.load(graph.save(tmp_path / "g.json"))
    assert again == graph and again.to_json() == graph.to_json()
    nx_graph = graph.to_networkx()
    assert set(nx_graph.nodes) == {str(n.ref) for n in graph.nodes}
    assert nx_graph.number_of_edges() == len(graph.edges)
    (tmp_path / "bad.json").write_text('{"schema_version": 7}')
    with pytest.raises(ff.CacheError, match="schema version 7"):
        FlowGraph.load(tmp_path / "bad.json")


def test_flow_map_summaries_round_trip_and_resume(planted, tmp_path, monkeypatch):
    bank, _ = planted
    tracer = FlowTracer(bank)
    fmap = tracer.flow_map(tmp_path / "map", thresholds="paper", progress=False)
    assert fmap.layers == [1, 2, 3] and fmap.k == 1
    lengths = fmap.chain_lengths(t_res=0.5)
    assert [int(lengths[layer][CHAIN_INDEX[layer]]) for layer in (1, 2, 3)] == [1, 2, 0]
    assert int(fmap.chain_lengths(t_res=0.25)[3][CHAIN_INDEX[3]]) == 3
    assert fmap.groups()[2] == tracer.classify(2, thresholds="paper").counts()
    loaded = FlowMap.load(tmp_path / "map")
    for layer in fmap.layers:
        for site in fmap[layer].scores:
            assert torch.equal(loaded[layer].scores[site], fmap[layer].scores[site])
            assert torch.equal(loaded[layer].indices[site], fmap[layer].indices[site])
    assert loaded.thresholds == fmap.thresholds and loaded.meta == fmap.meta

    # interrupted run: the second layer fails, a rerun computes only what is missing
    path = tmp_path / "resume"
    original = FlowTracer.scores
    calls = []

    def flaky(self, layer, k=1, **kwargs):
        calls.append(layer)
        if layer == 2 and len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, layer, k, **kwargs)

    monkeypatch.setattr(FlowTracer, "scores", flaky)
    with pytest.raises(KeyboardInterrupt):
        FlowTracer(bank).flow_map(path, thresholds="paper", progress=False)
    with pytest.raises(ff.CacheError, match="incomplete"):
        FlowMap.load(path)
    resumed = FlowTracer(bank).flow_map(path, thresholds="paper", progress=False)
    assert calls == [1, 2, 2, 3]
    assert all(torch.equal(resumed[layer].scores["res"], fmap[layer].scores["res"]) for layer in fmap.layers)
    # a different bank or settings at the same path is refused, nothing overwritten
    before = (path / MAP_INDEX).read_text()
    with pytest.raises(ff.FeatureFlowError, match="another bank or settings"):
        FlowTracer(bank).flow_map(path, k=2, thresholds="paper", progress=False)
    assert (path / MAP_INDEX).read_text() == before


def test_bad_input_gives_clear_errors(planted):
    bank, _ = planted
    tracer = FlowTracer(bank)
    with pytest.raises(ff.UnknownFeatureError, match=r"src \('mlp', 1\) is not in the bank"):
        tracer.match(("mlp", 1), ("res", 2))
    with pytest.raises(ff.UnknownFeatureError, match=r"no SAE for \('res', 9\)"):
        tracer.trace("9/res/0")
    with pytest.raises(ff.UnknownFeatureError, match="d_sae 12"):
        tracer.predecessors("2/res/12")
    with pytest.raises(ff.FeatureFlowError, match="k=13 is out of range"):
        tracer.match(("res", 1), ("res", 2), k=13)
    with pytest.raises(ff.FeatureFlowError, match="larger than"):
        tracer.predecessors("2/res/1", k=5)  # att 2 has 3 features
    with pytest.raises(ff.FeatureFlowError, match="is an mlp feature"):
        tracer.trace("2/mlp/0")
    with pytest.raises(ff.UnknownFeatureError, match=r"layers \[7\] have no res SAE"):
        tracer.flow_map(layers=[7], progress=False)
    with pytest.raises(ff.FeatureFlowError, match="thresholds"):
        tracer.classify(2, thresholds="median")  # type: ignore[arg-type]
    with pytest.raises(ff.FeatureFlowError, match="lack sites"):
        tracer.classify(2, thresholds={"res": 0.5})
    with pytest.raises(ff.errors.ModelMismatchError, match="d_model=32"):
        from transformer_lens import HookedTransformer

        from tl_featureflow.synthetic import tiny_cfg
        FlowTracer(bank, HookedTransformer(tiny_cfg()))


def test_logit_lens_labels_nodes_when_a_model_is_given(tiny_model, bank_factory):
    bank = bank_factory(sites=["res", "mlp"], layers=[0, 1])
    tracer = FlowTracer(bank, tiny_model)
    lens = tracer.labels.logit_lens("1/res/4", k=3)
    direction = bank.decoder("res", 1)[4] * tiny_model.ln_final.w
    expected = (direction @ tiny_model.W_U).topk(3)
    assert [int(t) for t, _ in lens] == expected.indices.tolist()  # no tokenizer: ids as text
    graph = tracer.trace("1/res/4", t_res=-1.0, t_module=-1.0)
    assert all(node.label for node in graph.nodes)
    with pytest.raises(ff.FeatureFlowError, match="needs a model"):
        FlowTracer(bank).labels.logit_lens("1/res/4")

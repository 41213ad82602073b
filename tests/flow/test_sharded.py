"""The sharded flow map and contexts (flow/sharded.py) in one process (``single()`` ranks): the files of
FlowTracer.flow_map, a resumed folder recomputes only what is missing, a map of other settings is refused.
Two gloo ranks: tests/distributed/."""

from __future__ import annotations

import shutil

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.distributed import single
from tl_featureflow.flow import sharded
from tl_featureflow.flow.contexts import TopContexts, collect_top_contexts
from tl_featureflow.synthetic import planted_chain_bank, random_bank, tiny_model


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_one_rank_writes_the_files_of_flow_map_and_resumes_only_the_missing_layer(tmp_path, monkeypatch):
    tracer = ff.FlowTracer(planted_chain_bank()[0])
    reference = tracer.flow_map(tmp_path / "one", progress=False)
    fmap = sharded.flow_map(tracer, tmp_path / "sharded", single(), progress=False)
    assert _files(tmp_path / "sharded") == _files(tmp_path / "one")
    assert fmap.meta == reference.meta and fmap.thresholds == reference.thresholds
    # a run killed after layers 1 and 3 were written: layer 2's file is partial, so only its 3 pairs are redone
    shutil.copytree(tmp_path / "one", tmp_path / "killed")
    layer2 = tmp_path / "killed" / "layer_002.safetensors"
    layer2.write_bytes(layer2.read_bytes()[:100])
    calls = []
    pair = sharded._pair
    monkeypatch.setattr(sharded, "_pair", lambda tracer, p, *a: calls.append(p) or pair(tracer, p, *a))
    sharded.flow_map(tracer, tmp_path / "killed", single(), progress=False)
    assert calls == [(2, "res"), (2, "mlp"), (2, "att")]
    assert _files(tmp_path / "killed") == _files(tmp_path / "one")
    with pytest.raises(ff.CacheError, match=r"another bank or settings \(differs in \['k'\]\)"):
        sharded.flow_map(tracer, tmp_path / "one", single(), k=2, progress=False)


def test_one_rank_collects_the_contexts_of_one_pass():
    model, bank = tiny_model(), random_bank(range(3), d_sae=32)
    tokens = torch.randint(1, 100, (5, 9), generator=torch.Generator().manual_seed(1))
    one = collect_top_contexts(model, bank, tokens, n=3, batch_size=2, progress=False)
    got = sharded.top_contexts(model, bank, tokens, single(), n=3, batch_size=2, progress=False)
    assert got.meta == one.meta and all(torch.equal(getattr(got, t)[k], getattr(one, t)[k])
                                        for t in TopContexts._TABLES for k in one.values)
    with pytest.raises(ff.InvalidArgumentError, match="a stream cannot be cut into shards"):
        sharded.top_contexts(model, bank, iter([tokens]), single())

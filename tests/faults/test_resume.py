"""What a resume must refuse or take in turn: flow maps of other thresholds, two trainings in one folder
(issue 24 #7, #13)."""

from __future__ import annotations

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow._files import exclusive_lock
from tl_featureflow.synthetic import planted_chain_bank, tiny_model


@pytest.mark.parametrize("first,second", [(0.3, 0.7), (0.3, {"res": 0.3, "mlp": 0.2, "att": 0.3}), (0.3, "chance")])
def test_a_flow_map_does_not_resume_with_other_thresholds(tmp_path, first, second):
    """#7: flow_map(path, thresholds=0.7) over a map made with 0.3 resumed and returned 0.3."""
    tracer = ff.FlowTracer(planted_chain_bank()[0])
    made = tracer.flow_map(tmp_path / "map", thresholds=first, progress=False)
    assert all(v == pytest.approx(0.3) for layer in made.layers for v in made.thresholds[layer].values())
    with pytest.raises(ff.FeatureFlowError, match="threshold"):
        tracer.flow_map(tmp_path / "map", thresholds=second, progress=False)
    again = tracer.flow_map(tmp_path / "map", thresholds=first, progress=False)     # the same settings resume
    assert again.thresholds == made.thresholds


def test_a_second_training_into_the_same_folder_is_refused(tmp_path):
    """#13: two train_bank runs into one folder both ran. The lock is held here as another process would."""
    model = tiny_model(n_layers=2, d_model=16)
    rows = torch.randint(1, 100, (64, 33), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "run"
    with exclusive_lock(tmp_path / ".run.training.lock", "a training"), \
            pytest.raises(ff.CacheError, match="already running"):
        ff.train_bank(model, preset="tiny", out=out, tokens=rows, progress=False)
    assert not out.exists()                                     # nothing was written by the refused run

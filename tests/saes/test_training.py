"""Training SAE banks with SAELens on a tiny model: quality improves, saves, resumes exactly."""

import json

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.saes import training
from tl_featureflow.saes.training import ActivationStream, train_bank
from tl_featureflow.synthetic import D_VOCAB

# tiny SAEs on a random model reconstruct poorly: the quality warning is expected here
pytestmark = pytest.mark.filterwarnings("ignore::tl_featureflow.saes.quality.BankQualityWarning")


@pytest.fixture(scope="module")
def rows():
    # structured text: repeated random "phrases", so there is something to learn
    gen = torch.Generator().manual_seed(0)
    phrases = torch.randint(1, D_VOCAB, (12, 31), generator=gen)
    picks = torch.randint(0, 12, (260,), generator=gen)
    body = phrases[picks]
    return torch.cat([torch.zeros(260, 1, dtype=torch.int64), body], dim=1)  # BOS (0) + 31 tokens


@pytest.fixture(scope="module")
def model():
    from transformer_lens import HookedTransformer

    from tl_featureflow.synthetic import tiny_cfg

    torch.manual_seed(0)
    return HookedTransformer(tiny_cfg()).eval()


def _state(bank):
    return {(k, n): t for k, sae in bank.items() for n, t in sae.state_dict().items()}


def test_training_improves_saves_and_records_metadata(model, rows, tmp_path):
    held_out = rows[200:]
    barely = train_bank(model, preset="tiny", out=tmp_path / "barely", tokens=rows[:200], eval_tokens=held_out,
                        training_tokens=128, progress=False)
    bank = train_bank(model, preset="tiny", out=tmp_path / "run", tokens=rows[:200], eval_tokens=held_out,
                      progress=False)
    assert sorted(bank) == sorted((s, layer) for s in ("res", "mlp", "att") for layer in (0, 1))
    assert all(type(sae).__name__ == "JumpReLUSAE" for sae in bank.values())  # BatchTopK saved as JumpReLU
    before = {(r["site"], r["layer"]): r["explained_variance"] for r in barely.metadata["quality"]["rows"]}
    after = {(r["site"], r["layer"]): r["explained_variance"] for r in bank.metadata["quality"]["rows"]}
    assert all(after[k] > before[k] + 0.05 for k in after), (before, after)
    assert bank.metadata["preset"] == "tiny" and bank.metadata["training_tokens"] == 32_768
    assert bank.metadata["corpus"]["hash"] and bank.metadata["sae_lens"]
    loaded = ff.SAEBank.load(tmp_path / "run" / "bank")
    mine, theirs = _state(bank), _state(loaded)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary debris
    # one threshold per feature (saes/thresholds.py), each SAE's L0 kept
    assert all(sae.threshold.unique().numel() > sae.cfg.d_sae // 4 for sae in bank.values())
    infos = bank.metadata["thresholds"]["saes"]
    assert sorted(infos) == sorted(f"{layer}/{site}" for site, layer in bank)
    assert all(info["l0_after"] == pytest.approx(info["l0_before"], rel=0.02) for info in infos.values())


@pytest.mark.parametrize("trainer", ["fast", "saelens"])
def test_an_interrupted_run_resumes_to_the_same_bank(model, rows, tmp_path, monkeypatch, trainer):
    whole = train_bank(model, preset="tiny", out=tmp_path / "a", tokens=rows, progress=False, trainer=trainer)
    original = ActivationStream.batch
    checkpoints_at_kill = []

    def killed(self, index):
        if index == 120:  # after the first checkpoint (at ~11k of 32k tokens)
            checkpoints_at_kill.extend(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(ActivationStream, "batch", killed)
    with pytest.raises(KeyboardInterrupt):
        train_bank(model, preset="tiny", out=tmp_path / "b", tokens=rows, progress=False, trainer=trainer)
    monkeypatch.setattr(ActivationStream, "batch", original)
    assert checkpoints_at_kill and not (tmp_path / "b" / "bank").exists()
    resumed = train_bank(model, preset="tiny", out=tmp_path / "b", tokens=rows, progress=False, trainer=trainer)
    assert resumed.metadata["trainer"] == trainer
    mine, theirs = _state(whole), _state(resumed)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_partial_checkpoint_is_never_resumed_from(tmp_path):
    (tmp_path / "100").mkdir()
    (tmp_path / "100" / "weights").write_text("half written")
    assert training._latest_checkpoint(tmp_path) is None and not (tmp_path / "100").exists()


def test_activation_stream_is_a_pure_function_of_the_step(model, rows):
    hooks = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]
    a = ActivationStream(model, rows, hooks, batch_tokens=100, chunk_rows=16, seed=3, last_block=1)
    b = ActivationStream(model, rows, hooks, batch_tokens=100, chunk_rows=16, seed=3, last_block=1)
    first = [a.batch(i) for i in range(12)]
    assert all(torch.equal(first[7][h], b.batch(7)[h]) for h in hooks)
    assert first[0][hooks[0]].shape == (100, 32)
    assert not torch.equal(first[0][hooks[0]], first[1][hooks[0]])
    with pytest.raises(ff.FeatureFlowError, match="fewer than one batch"):
        ActivationStream(model, rows, hooks, batch_tokens=10_000, chunk_rows=16)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sites=["resid"]), ff.FeatureFlowError, "unknown sites"),
        (dict(layers=[1, 3]), ff.errors.ModelMismatchError, r"layers \[3\] are not layers of the model"),
        (dict(preset="huge"), ff.FeatureFlowError, "unknown preset"),
    ],
)
def test_bad_requests_are_refused(model, rows, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        train_bank(model, out=tmp_path / "x", tokens=rows, progress=False, **{"preset": "tiny", **kwargs})


def test_a_corpus_too_small_for_one_batch_is_refused(model, rows, tmp_path):
    with pytest.raises(ff.FeatureFlowError, match="one chunk needs 16"):
        train_bank(model, preset="tiny", out=tmp_path / "x", tokens=rows[:5], progress=False)
    assert not (tmp_path / "x").exists()  # nothing written


def test_an_output_folder_of_another_run_is_not_overwritten(model, rows, tmp_path):
    train_bank(model, preset="tiny", out=tmp_path / "run", tokens=rows, training_tokens=1024, progress=False)
    run_json = (tmp_path / "run" / "run.json").read_text()
    bank_json = (tmp_path / "run" / "bank" / "bank.json").read_text()
    with pytest.raises(ff.FeatureFlowError, match="another training run"):
        train_bank(model, preset="tiny", out=tmp_path / "run", tokens=rows, sites=["res"], progress=False)
    assert (tmp_path / "run" / "run.json").read_text() == run_json
    assert (tmp_path / "run" / "bank" / "bank.json").read_text() == bank_json
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep")
    with pytest.raises(ff.FeatureFlowError, match="not empty"):
        train_bank(model, preset="tiny", out=tmp_path / "other", tokens=rows, progress=False)
    assert json.loads(run_json)["preset"]["name"] == "tiny"


def test_the_fast_step_trains_the_bank_saelens_would(model, rows, tmp_path):
    from dataclasses import replace

    # the trained SAEs themselves: per-feature thresholds are discrete cuts that rounding can move by a token
    preset = replace(training.PRESETS["tiny"], calibration_tokens=0)
    fast = train_bank(model, preset=preset, out=tmp_path / "fast", tokens=rows, progress=False)
    theirs = train_bank(model, preset=preset, out=tmp_path / "saelens", tokens=rows, progress=False,
                        trainer="saelens")
    assert fast.metadata["trainer"] == "fast" and theirs.metadata["trainer"] == "saelens"
    for key, sae in theirs.items():            # 256 steps of float32 rounding apart, no more
        for name, tensor in sae.state_dict().items():
            torch.testing.assert_close(fast[key].state_dict()[name], tensor, rtol=1e-3, atol=1e-4)
    with pytest.raises(ff.InvalidArgumentError, match="unknown trainer"):
        train_bank(model, preset="tiny", out=tmp_path / "x", tokens=rows, progress=False, trainer="mine")


def test_a_checkpoint_bank_is_the_bank_of_a_run_that_stopped_there(model, rows, tmp_path):
    """Constant learning rate and a deterministic stream: the curve of a long run's checkpoints is exact."""
    from dataclasses import replace

    preset = replace(training.PRESETS["tiny"], calibration_tokens=0)   # SAELens's conversion on both sides
    train_bank(model, preset=preset, out=tmp_path / "long", tokens=rows[:200], layers=[1], sites=["res"],
               progress=False)
    found = training.checkpoints(tmp_path / "long")
    assert len(found) == preset.n_checkpoints
    tokens = min(found)
    early = training.load_checkpoint_bank(found[tokens], keys=[("res", 1)])
    assert early.metadata["training_tokens"] == tokens < preset.training_tokens
    short = train_bank(model, preset=preset, out=tmp_path / "short", tokens=rows[:200], layers=[1], sites=["res"],
                       training_tokens=tokens, progress=False)
    for name, tensor in short["res", 1].state_dict().items():
        torch.testing.assert_close(early["res", 1].state_dict()[name], tensor, rtol=1e-6, atol=1e-6)
    with pytest.raises(ff.FeatureFlowError, match=r"\('mlp', 1\)"):
        training.load_checkpoint_bank(found[tokens], keys=[("mlp", 1)])

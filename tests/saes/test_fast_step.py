"""The sparse BatchTopK training step: SAELens's loss and gradients, and SAELens's training run."""

import pytest
import torch
from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput

from tl_featureflow import _compat
from tl_featureflow.saes import fast_step
from tl_featureflow.saes.fast_step import batchtopk_step, supports


def _sae(rescale=True, apply=True, d_in=16, d_sae=48, k=4.0, seed=0):
    torch.manual_seed(seed)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply,
        normalize_activations="expected_average_only_in"))
    with torch.no_grad():            # biases and decoder norms away from their initial values
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
    return sae


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("apply", [True, False])
@pytest.mark.parametrize("n_dead", [0, 5, 40])
def test_loss_and_gradients_equal_saelens_autograd(rescale, apply, n_dead):
    sae = _sae(rescale, apply)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, dead_neuron_mask=dead, coefficients={},
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    mine = batchtopk_step(x, sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach(), k=4.0,
                          apply_b_dec_to_input=apply, rescale_acts_by_decoder_norm=rescale, dead_mask=dead)
    torch.testing.assert_close(mine.mse, out.losses["mse_loss"].detach())
    torch.testing.assert_close(mine.aux, out.losses["auxiliary_reconstruction_loss"].detach())
    assert (float(mine.aux) > 0) == (n_dead > 0)
    torch.testing.assert_close(mine.sae_out, out.sae_out.detach())
    dense = torch.zeros(32, 48).index_put_((mine.rows, mine.cols), mine.values)
    torch.testing.assert_close(dense, out.feature_acts.detach())
    for name, param in sae.named_parameters():
        torch.testing.assert_close(mine.grads[name], param.grad, rtol=1e-5, atol=1e-6 * float(param.grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_a_cutoff_only_changes_where_the_top_k_is_searched():
    sae = _sae(d_in=32, d_sae=256, k=8.0)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    args = (x, sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach())
    plain = batchtopk_step(*args, k=8.0)
    kth = float(plain.values.min())
    for cutoff in (0.5 * kth, 2.0 * kth):              # enough candidates / too few: the fallback
        cut = batchtopk_step(*args, k=8.0, cutoff=cutoff)
        assert torch.equal(cut.rows, plain.rows) and torch.equal(cut.cols, plain.cols)
        assert all(torch.equal(cut.grads[n], plain.grads[n]) for n in plain.grads)


def _trainer_run(fast: bool, steps: int = 240):
    """One SAE trained by SAELens's MultiSAETrainer on planted sparse data; per-step (mse, aux, dead)."""
    d_in, d_sae, batch = 32, 128, 64
    torch.manual_seed(0)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=6,
                                                          normalize_activations="expected_average_only_in"))
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=3e-3,
                           lr_end=3e-4, device="cpu", dead_feature_window=20, feature_sampling_window=100,
                           n_checkpoints=0, checkpoint_path="unused", n_batches_for_norm_estimate=2)
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(300, d_in, generator=gen)
    data = [((torch.rand(batch, 300, generator=gen) < 0.03) * torch.rand(batch, 300, generator=gen) * 3) @ basis
            for _ in range(steps + 2)]
    multi = _compat.multi_sae_trainer_class()(cfg=cfg, saes={"s": sae}, hook_names={"s": "h"},
                                              data_provider=iter([{"h": b} for b in data[2:]]),
                                              save_checkpoint_fn=lambda path: None)
    trainer = multi.trainers["s"]
    _compat.estimate_scaling_factor(trainer, d_in, iter(data[:2]), 2)
    if fast:
        assert fast_step.use_fast_step(trainer) is None
    step, record = trainer._train_step, []

    def recording(sae, sae_in):
        out = step(sae, sae_in)
        record.append((float(out.losses["mse_loss"].detach()), float(out.losses["auxiliary_reconstruction_loss"].detach()),
                       int(trainer.dead_neurons.sum())))
        return out

    trainer._train_step = recording
    with _compat.quiet_sae_lens_bars():
        multi.fit()
    return record, sae, trainer


def test_a_run_reaches_saelens_loss_from_the_same_seed():
    theirs, their_sae, their_trainer = _trainer_run(fast=False)
    mine, my_sae, my_trainer = _trainer_run(fast=True)
    assert any(dead for _, _, dead in theirs)                   # the auxiliary loss was exercised
    assert [d for *_, d in mine] == [d for *_, d in theirs]
    for (m_mse, m_aux, _), (t_mse, t_aux, _) in zip(mine, theirs, strict=True):
        assert m_mse == pytest.approx(t_mse, rel=1e-4) and m_aux == pytest.approx(t_aux, rel=1e-4, abs=1e-6)
    for name, param in their_sae.named_parameters():
        torch.testing.assert_close(dict(my_sae.named_parameters())[name], param, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(my_sae.topk_threshold, their_sae.topk_threshold, rtol=1e-5, atol=0)
    torch.testing.assert_close(my_trainer.act_freq_scores, their_trainer.act_freq_scores)


def test_unsupported_saes_keep_saelens_step():
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2))
    assert "not a plain BatchTopKTrainingSAE" in supports(topk)
    layer_norm = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=2,
                                                                 normalize_activations="layer_norm"))
    assert "layer_norm" in supports(layer_norm)
    assert supports(_sae()) is None


def test_batch_topk_keeps_the_same_set_with_and_without_the_cutoff_hint():
    """Issue 24 #10: with 200 ties at the cutoff, topk on the candidates and on the whole kept different sets,
    and the hint is not checkpointed, so a resumed run drifted (4.3e-7 from the uninterrupted one)."""
    from tl_featureflow.saes.fast_step import _batch_topk

    torch.manual_seed(0)
    a = torch.rand(4096)
    a[torch.randint(0, 4096, (200,))] = 0.75
    K = int((a > 0.75).sum()) + 50
    with_hint, without = _batch_topk(a, K, 0.5)[1], _batch_topk(a, K, None)[1]
    assert with_hint.numel() == without.numel() == K
    assert torch.equal(with_hint.sort().values, without.sort().values)
    ties = (a == 0.75).nonzero().squeeze(1)
    kept_ties = sorted(set(without.tolist()) & set(ties.tolist()))
    assert kept_ties == ties.tolist()[:50]                              # the lowest indices win
    assert torch.equal(a[without], _batch_topk(a, K, None)[0])

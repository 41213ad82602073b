"""Per-feature JumpReLU thresholds (issue 12): planted SAEs where the right cut is known exactly."""

import math

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.flow.matching import fold_jumprelu_threshold
from tl_featureflow.saes.thresholds import (
    THRESHOLD_FLOOR,
    calibrate_thresholds,
    cut_thresholds,
    squared_error_change,
)
from tl_featureflow.synthetic import sae_from_decoder

D = 16


def planted_sae(scales: torch.Tensor, threshold: float = 0.5):
    """A JumpReLU SAE with unit orthogonal decoder rows and encoder ``s_i * d_i``: features never interact.

    Feature ``i`` firing at pre-activation ``a = s_i x_i`` changes the squared error by
    ``x_i^2 s_i (s_i - 2)``, so with cost ``lam`` per firing it should fire exactly when
    ``a > sqrt(lam s_i / (2 - s_i))`` (never when ``s_i >= 2``).
    """
    sae = sae_from_decoder("res", 1, torch.eye(D), arch="jumprelu")
    with torch.no_grad():
        sae.W_enc.mul_(scales.unsqueeze(0))
        sae.threshold.fill_(threshold)
    return sae


def activations(n=6000, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2


SCALES = torch.linspace(0.4, 1.9, D)


def test_squared_error_change_is_the_change_in_squared_error():
    sae = planted_sae(SCALES)
    x = activations(200)
    pre = x * SCALES
    residual_dot = x.clone()                    # orthonormal decoder: (x - x_hat) . d_i + own contribution = x_i
    delta = squared_error_change(pre, residual_dot, torch.ones(D))
    for i in (0, 7, 15):                         # fire only feature i, by hand
        acts = torch.zeros_like(pre)
        acts[:, i] = pre[:, i].clamp(min=0)
        by_hand = ((x - sae.decode(acts)) ** 2).sum(-1) - (x ** 2).sum(-1)
        torch.testing.assert_close(delta[:, i], by_hand, rtol=1e-4, atol=1e-4)


def test_cuts_fire_exactly_where_firing_pays():
    x = activations().double()                  # float64: no token so near the boundary that rounding decides
    pre = x * SCALES.double()
    delta = squared_error_change(pre, x, torch.ones(D, dtype=torch.float64))
    lam = 1.5
    theta = cut_thresholds(pre, delta, lam)
    fired = pre > theta
    pays = (delta + lam < 0) & (pre > 0)
    assert torch.equal(fired, pays)             # independent features: the cut is the exact optimum
    expected = torch.sqrt(lam * SCALES.double() / (2 - SCALES.double()))
    below = torch.where(pre <= expected, pre, torch.full_like(pre, -math.inf)).amax(0)   # the first value left out
    above = torch.where(pre > expected, pre, torch.full_like(pre, math.inf)).amin(0)     # the last value kept
    torch.testing.assert_close(theta, (below + above) / 2)
    assert theta.unique().numel() == D          # one threshold per feature


def test_a_feature_that_never_pays_never_fires():
    x = activations(500)
    scales = SCALES.clone()
    scales[3] = 2.5                             # overshooting encoder: every firing makes the error worse
    pre = x * scales
    theta = cut_thresholds(pre, squared_error_change(pre, x, torch.ones(D)), 0.0)
    assert not (pre[:, 3] > theta[3]).any()
    assert (pre[:, 0] > theta[0]).any()
    assert float(theta.min()) >= THRESHOLD_FLOOR * (1 - 1e-6)


def test_calibration_keeps_l0_lowers_the_loss_and_leaves_the_sae_alone():
    sae = planted_sae(SCALES, threshold=1.0)
    before = {n: t.clone() for n, t in sae.state_dict().items()}
    x = activations()
    calibrated, info = calibrate_thresholds(sae, x, keep=0)
    assert all(torch.equal(before[n], t) for n, t in sae.state_dict().items())     # the user's SAE untouched
    assert info.l0_after == pytest.approx(info.l0_before, rel=0.01)                # same sparsity ...
    assert info.mse_after < info.mse_before                                        # ... better reconstruction
    theta = calibrated.threshold.detach()
    ratio = theta ** 2 * (2 - SCALES) / SCALES                                      # = lam for every feature
    assert float(ratio.std() / ratio.mean()) < 0.05
    torch.testing.assert_close(ratio.mean(), torch.tensor(info.lam), rtol=0.05, atol=0)
    assert float(theta.max() / theta.min()) > 3                                     # thresholds differ per feature


def test_target_l0_is_met():
    sae = planted_sae(SCALES)
    x = activations()
    calibrated, info = calibrate_thresholds(sae, x, target_l0=3.0, keep=0)
    assert info.l0_after == pytest.approx(3.0, rel=0.01)
    assert float((calibrated.encode(x) > 0).sum(-1).float().mean()) == pytest.approx(3.0, rel=0.01)


def test_every_feature_keeps_a_share_of_its_firing():
    scales = SCALES.clone()
    scales[3] = 2.5                                                                 # never pays for its firing
    sae = planted_sae(scales, threshold=1.0)
    x = activations()
    before = (sae.encode(x) > 0).sum(0)
    pruned, _ = calibrate_thresholds(sae, x, keep=0)
    assert int((pruned.encode(x) > 0).sum(0)[3]) == 0                               # switched off
    kept, info = calibrate_thresholds(sae, x, keep=0.5)
    after = (kept.encode(x) > 0).sum(0)
    assert bool((after >= (0.5 * before).floor() * 0.98).all()), (after, before)   # within the L0 rescaling
    assert info.dead_after == 0 and info.mse_after < info.mse_before


def test_folding_per_feature_thresholds_changes_decoder_norms_per_feature_not_the_output():
    sae = planted_sae(SCALES, threshold=1.0)
    x = activations()
    calibrated, _ = calibrate_thresholds(sae, x)
    folded = fold_jumprelu_threshold(calibrated)
    norms = folded.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, calibrated.threshold.detach())                # norm_i = theta_i (unit rows)
    assert norms.unique().numel() == D
    torch.testing.assert_close(folded(x), calibrated(x), rtol=1e-4, atol=1e-4)
    single = fold_jumprelu_threshold(sae)                                           # one threshold: one norm
    assert single.W_dec.norm(dim=-1).unique().numel() == 1


def test_bad_calibration_input():
    with pytest.raises(ff.FeatureFlowError, match="JumpReLU"):
        calibrate_thresholds(sae_from_decoder("res", 1, torch.eye(D)), activations(10))
    with pytest.raises(ff.InvalidArgumentError, match=r"\[n, 16\]"):
        calibrate_thresholds(planted_sae(SCALES), torch.randn(10, 8))
    with pytest.raises(ff.InvalidArgumentError, match="d_sae"):
        cut_thresholds(torch.zeros(4, 3), torch.zeros(4, 2), 1.0)


def _cut_by_hand(pre, delta, lam, max_rows=None, min_fired=None):
    """Each feature on its own: try every prefix of its positive values, largest first."""
    theta = torch.empty(pre.shape[1], dtype=pre.dtype)
    for j in range(pre.shape[1]):
        values, order = pre[:, j].sort(descending=True)
        positive = int((values > 0).sum())
        m = positive if max_rows is None else min(positive, max_rows)
        gains = torch.cumsum(delta[order[:m], j].double() + lam, 0)
        n = int(gains.argmin()) + 1 if m and float(gains.min()) < 0 else 0
        if min_fired is not None:
            n = max(n, min(int(min_fired[j]), m))
        if n == 0:
            theta[j] = torch.nextafter(values[0], torch.tensor(math.inf, dtype=pre.dtype)) if m else 0.0
        else:
            theta[j] = (values[n - 1] + (values[n].clamp(min=0) if n < m else 0.0)) / 2
    return theta.clamp(min=THRESHOLD_FLOOR)


def test_the_sparse_cuts_equal_a_by_hand_search_per_feature():
    from tl_featureflow.saes.thresholds import _Cuts

    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(300, 40, generator=gen, dtype=torch.float64) - 1.0       # ~16% positive, as in real SAEs
    pre[:, 5] = -1.0                                                           # a feature that is never positive
    delta = torch.randn(300, 40, generator=gen, dtype=torch.float64)
    for lam in (-0.5, 0.0, 0.3, 2.0):
        torch.testing.assert_close(cut_thresholds(pre, delta, lam), _cut_by_hand(pre, delta, lam), rtol=0, atol=0)
    min_fired = torch.randint(0, 30, (40,), generator=gen)
    cuts = _Cuts(pre, 20, min_fired)
    cuts.set_delta(delta)
    theta, n_fired = cuts.thresholds(0.3)
    torch.testing.assert_close(theta, _cut_by_hand(pre, delta, 0.3, 20, min_fired), rtol=0, atol=0)
    assert int(n_fired[5]) == 0 and float(theta[5]) == THRESHOLD_FLOOR
    assert bool((n_fired <= 20).all())

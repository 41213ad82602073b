import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.flow.matching import fold_jumprelu_threshold, permutation_match, topk_cosine, unit_rows


def _dense_reference(dst, src, k):
    sims = unit_rows(dst).double() @ unit_rows(src).double().T
    scores, indices = torch.sort(sims, dim=1, descending=True, stable=True)
    return scores[:, :k].float(), indices[:, :k]


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("shape", [(40, 40), (37, 91), (130, 17)])
def test_topk_equals_a_dense_reference(k, shape):
    gen = torch.Generator().manual_seed(k * 100 + shape[0])
    dst, src = torch.randn(shape[0], 24, generator=gen), torch.randn(shape[1], 24, generator=gen)
    scores, indices = topk_cosine(dst, src, k, normalize=True, chunk_size=16)
    ref_scores, ref_indices = _dense_reference(dst, src, k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64 and scores.shape == (shape[0], k)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_accumulated_in_float32(dtype):
    gen = torch.Generator().manual_seed(3)
    dst, src = unit_rows(torch.randn(50, 64, generator=gen)), unit_rows(torch.randn(70, 64, generator=gen))
    dst_lp, src_lp = dst.to(dtype), src.to(dtype)
    scores, indices = topk_cosine(dst_lp, src_lp, 5)
    ref_scores, ref_indices = _dense_reference(dst_lp.float(), src_lp.float(), 5)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=2e-2)  # rows of low-precision inputs are ~unit
    assert (indices[:, 0] == ref_indices[:, 0]).float().mean() > 0.95


def test_rescaling_rows_changes_nothing_when_normalising():
    gen = torch.Generator().manual_seed(5)
    dst, src = torch.randn(30, 16, generator=gen), torch.randn(45, 16, generator=gen)
    a = topk_cosine(dst, src, 3, normalize=True)
    b = topk_cosine(dst * (torch.rand(30, 1, generator=gen) * 9 + 0.1),
                    src * (torch.rand(45, 1, generator=gen) * 5 + 0.1), 3, normalize=True)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)


def test_chunking_does_not_change_results():
    gen = torch.Generator().manual_seed(7)
    dst, src = unit_rows(torch.randn(101, 8, generator=gen)), unit_rows(torch.randn(33, 8, generator=gen))
    whole = topk_cosine(dst, src, 4, chunk_size=1000)
    for chunk in (1, 7, 100):
        part = topk_cosine(dst, src, 4, chunk_size=chunk)
        assert torch.equal(whole[1], part[1])
        torch.testing.assert_close(whole[0], part[0], rtol=0, atol=1e-6)  # BLAS blocking may round differently


def test_ties_go_to_the_lowest_index():
    src = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    dst = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    _, top1 = topk_cosine(dst, src, 1)
    assert top1[:, 0].tolist() == [1, 0, 0]
    _, top3 = topk_cosine(dst, src, 3)
    assert top3.tolist() == [[1, 2, 4], [0, 3, 1], [0, 1, 2]]


def test_planted_permutation_is_recovered_by_topk_and_assignment():
    gen = torch.Generator().manual_seed(11)
    src = unit_rows(torch.randn(300, 64, generator=gen))
    perm = torch.randperm(300, generator=gen)
    dst = src[perm] + 0.05 * torch.randn(300, 64, generator=gen)
    _, indices = topk_cosine(dst, src, 1, normalize=True)
    assert torch.equal(indices[:, 0], perm)
    scores, assignment = permutation_match(dst, src, normalize=True)
    assert torch.equal(assignment, perm) and bool((scores > 0.85).all())


def test_permutation_with_unequal_widths_and_the_size_limit():
    gen = torch.Generator().manual_seed(2)
    dst, src = torch.randn(10, 8, generator=gen), torch.randn(6, 8, generator=gen)
    scores, indices = permutation_match(dst, src, normalize=True)
    assigned = indices[indices >= 0]
    assert len(assigned) == 6 and len(set(assigned.tolist())) == 6 and torch.isnan(scores[indices < 0]).all()
    with pytest.raises(ff.FeatureFlowError, match="max_width=5"):
        permutation_match(dst, src, max_width=5)


@pytest.mark.parametrize(
    "dst, src, k, match",
    [
        (torch.zeros(3, 4), torch.zeros(5, 6), 1, "different spaces: d_model 4 vs 6"),
        (torch.zeros(3, 4), torch.zeros(5, 4), 6, "k=6 is out of range"),
        (torch.zeros(3, 4), torch.zeros(5, 4), 0, "k=0 is out of range"),
        (torch.zeros(4), torch.zeros(5, 4), 1, "expected 2-D"),
    ],
)
def test_bad_matching_input(dst, src, k, match):
    with pytest.raises(ff.FeatureFlowError, match=match):
        topk_cosine(dst, src, k)


def test_folding_jumprelu_thresholds_keeps_the_output(sae_factory):
    sae = sae_factory(arch="jumprelu", d_sae=40, seed=4)
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(40, generator=torch.Generator().manual_seed(0)) + 0.05)
    before = {n: t.clone() for n, t in sae.state_dict().items()}
    folded = fold_jumprelu_threshold(sae)
    assert all(torch.equal(before[n], t) for n, t in sae.state_dict().items())  # input untouched
    assert torch.equal(folded.threshold, torch.ones(40))
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(1)) * 3
    torch.testing.assert_close(folded(x), sae(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.encode(x) * sae.threshold, sae.encode(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unit_rows(folded.W_dec), unit_rows(sae.W_dec), rtol=0, atol=1e-6)


def test_folding_refuses_what_it_cannot_fold(sae_factory):
    with pytest.raises(ff.FeatureFlowError, match="JumpReLU"):
        fold_jumprelu_threshold(sae_factory(arch="topk"))
    sae = sae_factory(arch="jumprelu")
    with torch.no_grad():
        sae.threshold[0] = 0.0
    with pytest.raises(ff.FeatureFlowError, match="1 thresholds are <= 0"):
        fold_jumprelu_threshold(sae)

"""Preflight (issue 27): an SAE on the wrong tensor is caught with its FVU; one on the right tensor passes.

Planted: layer 1's attention writes only through head 0 (the other heads' W_O are zero), so attn_out lives in
the 8-dim row space U of head 0's W_O. An SAE with decoder [U; -U] and encoder [U^T, -U^T] reconstructs any
vector of that space exactly (ReLU(x U^T) U - ReLU(-x U^T) U = x U^T U): FVU 0 on hook_attn_out, while the
same SAE on hook_mlp_out (full rank) loses most of the variance.
"""

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer

import tl_featureflow as ff
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.preflight import PreflightWarning, preflight
from tl_featureflow.synthetic import D_MODEL, D_VOCAB, tiny_cfg


def _model_and_sae(hook: str):
    torch.manual_seed(0)
    model = HookedTransformer(tiny_cfg()).eval()
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.W_O[1:] = 0
        attn.b_O.zero_()
    basis = torch.linalg.qr(attn.W_O[0].detach().T)[0].T                           # [d_head, d_model], orthonormal
    sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=2 * basis.shape[0], metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([basis, -basis]))
        sae.W_enc.copy_(torch.cat([basis, -basis]).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return model, sae


def test_an_sae_on_its_site_passes_and_on_another_fails_with_its_fvu():
    tokens = torch.randint(0, D_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    model, sae = _model_and_sae(ff.hook_name("att", 1))
    good = preflight(model, SAEBank({("att", 1): sae}), tokens, on_fail="raise")
    assert good.rows[0].fvu < 1e-6 and not good.failed
    model, wrong = _model_and_sae(ff.hook_name("mlp", 1))
    bank = SAEBank({("att", 1): sae, ("mlp", 1): wrong})
    with pytest.warns(PreflightWarning, match=r"\('mlp', 1\) on blocks\.1\.hook_mlp_out: FVU \d+\.\d\d > 0\.9"):
        result = preflight(model, bank, tokens)
    assert [row.key for row in result.failed] == [("mlp", 1)]
    assert result.failed[0].fvu > 0.9 and "1 past FVU" in repr(result)
    with pytest.raises(ff.errors.ModelMismatchError, match="1 of 2 SAEs do not reconstruct"):
        preflight(model, bank, tokens, on_fail="raise")


def test_the_likely_cause_names_the_release_loading_kwargs():
    tokens = torch.randint(0, D_VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    model, wrong = _model_and_sae(ff.hook_name("mlp", 1))
    wrong.cfg.metadata.model_from_pretrained_kwargs = {"fold_ln": True}
    result = preflight(model, SAEBank({("mlp", 1): wrong}), tokens, on_fail="ignore")
    assert "fold_ln=True" in result.failed[0].cause and "normalization_type='LN'" in result.failed[0].cause
    with pytest.raises(ff.errors.InvalidArgumentError, match="max_fvu"):
        preflight(model, SAEBank({("mlp", 1): wrong}), tokens, max_fvu=float("nan"))

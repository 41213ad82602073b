"""Attention SAEs on ``attn.hook_z`` serve the att site through ``W_O`` (issue 27).

Planted: a z-SAE and an ``attn_out`` SAE built to be the same map (``attn_out = z @ W_O + b_O`` with a
square, invertible ``W_O``), so every result read through one must equal the other's, within float
tolerance: matches, feature activations, validation rows, attribution, steered logits. Both of
SAELens's z conventions are covered: ``reshape_activations="hook_z"`` (the SAE flattens the heads) and
a flat z-SAE (Gemma Scope 2's).
"""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer

import tl_featureflow as ff
from tl_featureflow.causal.attribution import split_preactivations
from tl_featureflow.causal.interventions import Intervention, res_activations
from tl_featureflow.errors import BankError, ModelMismatchError
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.sites import sae_input, z_write_map
from tl_featureflow.synthetic import D_MODEL, make_sae, tiny_cfg

LAYER = 1
D_SAE = 40


@pytest.fixture(scope="module")
def model() -> ff.FlowTransformer:
    torch.manual_seed(0)
    model = ff.FlowTransformer.from_hooked(HookedTransformer(tiny_cfg()).eval(), fast_path=False)
    attn = model.blocks[LAYER].attn                    # a well-conditioned W_O: the twin's W_O^-1 is exact
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(7)))
        attn.W_O.copy_((0.5 * q).reshape(attn.W_O.shape))
    return model


def _z_sae(model, reshape: str, seed: int = 3) -> StandardSAE:
    cfg = model.cfg
    sae = StandardSAE(StandardSAEConfig(d_in=cfg.n_heads * cfg.d_head, d_sae=D_SAE, reshape_activations=reshape,
                                        metadata=SAEMetadata(hook_name=f"blocks.{LAYER}.attn.hook_z")))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if name.startswith("b_") else 1.0))
    return sae


def _twin(model, z: StandardSAE) -> StandardSAE:
    """The attn_out SAE that is the same map as ``z``: W_dec' = W_dec W_O, W_enc' = W_O^-1 W_enc,
    b_dec' = b_dec W_O + b_O, b_enc' = b_enc."""
    W_O, b_O = (t.double() for t in z_write_map(model, LAYER))
    twin = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=D_SAE,
                                         metadata=SAEMetadata(hook_name=ff.hook_name("att", LAYER))))
    with torch.no_grad():
        twin.W_dec.copy_(z.W_dec.double() @ W_O)
        twin.W_enc.copy_(torch.linalg.solve(W_O, z.W_enc.double()))
        twin.b_dec.copy_(z.b_dec.double() @ W_O + b_O)
        twin.b_enc.copy_(z.b_enc)
    return twin


def _banks(model, reshape: str) -> tuple[SAEBank, SAEBank]:
    res = {("res", LAYER - 1): make_sae("res", LAYER - 1, d_sae=D_SAE, seed=1),
           ("res", LAYER): make_sae("res", LAYER, d_sae=D_SAE, seed=2),
           ("mlp", LAYER): make_sae("mlp", LAYER, d_sae=D_SAE, seed=4)}
    z = _z_sae(model, reshape)
    return SAEBank({**res, ("att", LAYER): z}), SAEBank({**res, ("att", LAYER): _twin(model, z)})


RESHAPES = ["hook_z", "none"]


@pytest.mark.parametrize("reshape", RESHAPES)
def test_a_z_sae_and_its_attn_out_twin_give_the_same_matches(model, reshape):
    z_bank, out_bank = _banks(model, reshape)
    assert z_bank.z_keys == [("att", LAYER)] and "att on attn.hook_z" in z_bank.describe()
    with pytest.raises(BankError, match="needs the model: bank.bind"):
        z_bank.decoder("att", LAYER)
    bound = z_bank.bind(model)
    torch.testing.assert_close(bound.decoder("att", LAYER), out_bank.decoder("att", LAYER), atol=1e-5, rtol=0)
    a = ff.FlowTracer(z_bank, model, contexts=None).match(("att", LAYER), ("res", LAYER), k=3)
    b = ff.FlowTracer(out_bank, model, contexts=None).match(("att", LAYER), ("res", LAYER), k=3)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reshape", RESHAPES)
def test_the_same_feature_activations_and_an_unchanged_model(model, reshape, tokens):
    z_bank, out_bank = _banks(model, reshape)
    clean = model(tokens)
    logits, acts = model.run_with_features(tokens, bank=z_bank, sites=["att"])
    _, twin = model.run_with_features(tokens, bank=out_bank, sites=["att"])
    assert acts["att", LAYER].shape == (*tokens.shape, D_SAE)
    torch.testing.assert_close(acts["att", LAYER], twin["att", LAYER], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, clean)                       # spliced on hook_z, outputs unchanged


@pytest.mark.parametrize("reshape", RESHAPES)
def test_deactivation_on_hook_z_is_the_mapped_subtraction_on_attn_out(model, reshape, tokens):
    z_bank, out_bank = _banks(model, reshape)
    text = tokens[:1]
    items = [[Intervention("att", LAYER, (f,), (p,), r)] for f, p, r in ((0, 3, 0.0), (5, 7, 0.0), (9, 4, -1.5))]
    positions = [3, 7, 4]
    for layer_local in (True, False):
        a = res_activations(model, z_bank, text, LAYER, positions, items, layer_local=layer_local)
        b = res_activations(model, out_bank, text, LAYER, positions, items, layer_local=layer_local)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # and by hand: z minus a_f d_f at hook_z equals attn_out minus a_f (d_f W_O) at hook_attn_out
    sae = z_bank["att", LAYER]
    _, cache = model.run_with_cache(text, names_filter=[f"blocks.{LAYER}.attn.hook_z", ff.hook_name("att", LAYER)])
    z = cache[f"blocks.{LAYER}.attn.hook_z"]
    a_f = sae.encode(sae_input(sae, z))[..., 5]
    W_O, _ = z_write_map(model, LAYER)
    edited = (z.flatten(-2) - a_f[..., None] * sae.W_dec[5]) @ W_O + model.blocks[LAYER].attn.b_O
    torch.testing.assert_close(edited, cache[ff.hook_name("att", LAYER)] - a_f[..., None] * (sae.W_dec[5] @ W_O),
                               atol=1e-5, rtol=0)


def test_the_same_validation_rows_and_attribution(model, tokens):
    z_bank, out_bank = _banks(model, "hook_z")
    rows = []
    for bank in (z_bank, out_bank):
        tracer = ff.FlowTracer(bank, model, contexts=None)
        report = tracer.validate(tokens, layers=[LAYER], methods=["top1", "attribution"], positions_per_text=4,
                                 progress=False)
        rows.append(report.rows)
    assert len(rows[0]) == len(rows[1]) > 0
    for a, b in zip(*rows, strict=True):
        assert (a.method, a.target, a.group, a.deactivated) == (b.method, b.target, b.group, b.deactivated)
        assert a.z_new == pytest.approx(b.z_new, abs=1e-3)
    split_z = split_preactivations(model, z_bank, tokens[:1], layer=LAYER, position=5, targets=[0, 1, 2])
    split_o = split_preactivations(model, out_bank, tokens[:1], layer=LAYER, position=5, targets=[0, 1, 2])
    torch.testing.assert_close(split_z.site_parts("att"), split_o.site_parts("att"), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(split_z.total(), split_z.pre, atol=1e-4, rtol=0)


@pytest.mark.parametrize("reshape", RESHAPES)
def test_the_same_steered_logits(model, reshape, tokens):
    z_bank, out_bank = _banks(model, reshape)
    ref = ff.FeatureRef(LAYER, "att", 6)
    for scale in ("unit", "decoder"):
        out = []
        for bank in (z_bank, out_bank):
            with ff.Steerer(model, bank, scale=scale).add(ref, 3.0).rescale(ff.FeatureRef(LAYER, "att", 2), 0.0):
                out.append(model(tokens))
        torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out[0], model(tokens), atol=1e-3)        # the edit did something


def test_z_banks_save_load_and_fingerprint_the_model(model, tmp_path):
    z_bank, _ = _banks(model, "hook_z")
    loaded = SAEBank.load(z_bank.save(tmp_path / "bank"))
    assert loaded.z_keys == [("att", LAYER)]
    assert loaded.fingerprint() == z_bank.fingerprint()
    torch.testing.assert_close(loaded.bind(model).decoder("att", LAYER), z_bank.bind(model).decoder("att", LAYER))
    other = HookedTransformer(tiny_cfg(seed=5))
    assert z_bank.bind(model).fingerprint() != z_bank.bind(other).fingerprint()


def test_a_bank_from_a_list_keys_z_saes_as_att(model):
    z = _z_sae(model, "hook_z")
    bank = SAEBank([make_sae("res", LAYER), z])
    assert list(bank) == [("res", LAYER), ("att", LAYER)] and bank.hook(("att", LAYER)) == "blocks.1.attn.hook_z"


def test_the_mapped_directions_follow_edits_of_W_O(tokens):
    model = ff.FlowTransformer.from_hooked(HookedTransformer(tiny_cfg()).eval(), fast_path=False)
    bank = SAEBank({("att", LAYER): _z_sae(model, "none")}).bind(model)
    before = bank.decoder("att", LAYER).clone()
    with torch.no_grad():
        model.blocks[LAYER].attn.W_O.mul_(torch.linspace(0.5, 2.0, D_MODEL))
    assert not torch.allclose(bank.decoder("att", LAYER), before, atol=1e-3)


def test_z_saes_of_the_wrong_width_or_hook_are_refused(model):
    narrow = HookedTransformer(tiny_cfg(n_heads=2))       # hook_z is 2 * 8 = 16 wide
    with pytest.raises(ModelMismatchError, match=r"n_heads \* d_head = 2 \* 8 = 16"):
        SAEBank({("att", LAYER): _z_sae(model, "hook_z")}).bind(narrow)
    with pytest.raises(ModelMismatchError, match="n_heads"):
        ff.FlowTracer(SAEBank({("att", LAYER): _z_sae(model, "hook_z")}), narrow, contexts=None)
    with pytest.raises(BankError, match="expected 'blocks.0.hook_attn_out' or 'blocks.0.attn.hook_z'"):
        SAEBank({("att", 0): _z_sae(model, "hook_z")})                  # the z hook of another layer
    with pytest.raises(BankError, match="expected 'blocks.1.hook_resid_post'"):
        SAEBank({("res", LAYER): _z_sae(model, "hook_z")})               # hook_z is an att site only
    transcoder = make_sae("mlp", LAYER, hook="blocks.0.ln2.hook_normalized")     # cross-layer: layer 0 in, 1 out
    transcoder.cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    with pytest.raises(BankError, match="cross-layer transcoder"):
        SAEBank({("mlp", LAYER): transcoder})


def test_steering_and_tracing_a_z_bank_while_it_is_attached(model, tokens):
    z_bank, out_bank = _banks(model, "hook_z")
    ref = ff.FeatureRef(LAYER, "att", 2)
    with ff.Steerer(model, z_bank, scale="unit").rescale(ref, 3.0):
        free = model(tokens)
    with model.attached(z_bank), ff.Steerer(model, z_bank, scale="unit").rescale(ref, 3.0):
        spliced = model(tokens)                     # the rescale goes to blocks.1.attn.hook_z.hook_sae_output
    torch.testing.assert_close(free, spliced, atol=1e-4, rtol=1e-4)
    graphs = [ff.FlowTracer(bank, model, contexts=None).trace(ff.FeatureRef(LAYER, "res", 0), t_res=0.0,
                                                              t_module=0.0) for bank in (z_bank, out_bank)]
    nodes = [g.to_dict()["nodes"] for g in graphs]
    assert [(n["ref"], n["role"]) for n in nodes[0]] == [(n["ref"], n["role"]) for n in nodes[1]]
    assert [n["s_att"] for n in nodes[0]] == pytest.approx([n["s_att"] for n in nodes[1]], abs=1e-5)

"""SAELens transcoders serve the ``mlp`` site of an SAEBank (issue 27).

A transcoder reads the MLP's input (``blocks.L.ln2.hook_normalized`` here) and writes
``blocks.L.hook_mlp_out``. Planted, exact by construction: its twin is an ``mlp_out`` SAE with the
same decoder (so the same data-free matches and the same steering adds); its activations are its
own encoder on the cached input hook; a deactivation or rescale at ``hook_mlp_out`` is the
subtraction ``(r - 1) * a * W_dec[f]`` with ``a`` read at the input, computed here by hand.
Refusals (cross-layer, foreign hooks, widths) and an offline ``from_pretrained`` of Gemma Scope's
transcoder release through SAELens's real loader close the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import SkipTranscoder, SkipTranscoderConfig, StandardSAE, StandardSAEConfig, Transcoder, TranscoderConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer

import tl_featureflow as ff
from tl_featureflow.causal.attribution import split_preactivations
from tl_featureflow.causal.interventions import Intervention, res_activations
from tl_featureflow.errors import FeatureFlowError, ModelMismatchError, TranscoderError
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.synthetic import D_MODEL, make_sae, tiny_cfg

LAYER = 1
D_SAE = 40
IN_HOOK = f"blocks.{LAYER}.ln2.hook_normalized"
OUT_HOOK = f"blocks.{LAYER}.hook_mlp_out"
RES_HOOK = f"blocks.{LAYER}.hook_resid_post"


@pytest.fixture(scope="module")
def model() -> ff.FlowTransformer:
    torch.manual_seed(0)
    return ff.FlowTransformer.from_hooked(HookedTransformer(tiny_cfg()).eval(), fast_path=False)


def _transcoder(kind: str = "plain", *, seed: int = 3, hook: str = IN_HOOK, out: str = OUT_HOOK,
                d_in: int = D_MODEL, d_out: int = D_MODEL) -> Transcoder:
    """A SAELens transcoder (``plain``: ``Transcoder``; ``skip``: ``SkipTranscoder`` with a non-zero W_skip)."""
    cls, cfg_cls = (Transcoder, TranscoderConfig) if kind == "plain" else (SkipTranscoder, SkipTranscoderConfig)
    sae = cls(cfg_cls(d_in=d_in, d_out=d_out, d_sae=D_SAE, apply_b_dec_to_input=False,   # SAELens refuses its default
                      metadata=SAEMetadata(hook_name=hook, hook_name_out=out)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if name.startswith("b_") or name == "W_skip" else 1.0))
    return sae


def _twin(tc: Transcoder) -> StandardSAE:
    """An ``mlp_out`` SAE with the transcoder's decoder (its encoder is its own)."""
    twin = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE, metadata=SAEMetadata(hook_name=OUT_HOOK)))
    with torch.no_grad():
        twin.W_dec.copy_(tc.W_dec)
        twin.b_dec.copy_(tc.b_dec)
        twin.W_enc.copy_(torch.randn(D_MODEL, D_SAE, generator=torch.Generator().manual_seed(9)))
    return twin


def _banks(kind: str = "plain", *, with_prev: bool = True) -> tuple[SAEBank, SAEBank]:
    res = {("res", LAYER): make_sae("res", LAYER, d_sae=D_SAE, seed=2)}
    if with_prev:
        res[("res", LAYER - 1)] = make_sae("res", LAYER - 1, d_sae=D_SAE, seed=1)
    tc = _transcoder(kind)
    return SAEBank({**res, ("mlp", LAYER): tc}), SAEBank({**res, ("mlp", LAYER): _twin(tc)})


def _input(model, tokens) -> torch.Tensor:
    return model.run_with_cache(tokens, names_filter=[IN_HOOK])[1][IN_HOOK]


@torch.no_grad()
def _by_hand(model, bank, tokens, features, position, r) -> torch.Tensor:
    """res(LAYER) activations at ``position`` with ``features`` of the transcoder rescaled by ``r`` at
    hook_mlp_out: ``mlp_out + (r - 1) a_f W_dec[f]``, ``a`` from the encoder on the input hook."""
    sae = bank["mlp", LAYER]
    a = sae.encode(_input(model, tokens))[:, position, list(features)]            # [batch, n_feat]

    def edit(h, hook):
        h = h.clone()
        h[:, position] += (r - 1.0) * a @ sae.W_dec[list(features)]
        return h

    resid = model.run_with_hooks(tokens, fwd_hooks=[(OUT_HOOK, edit)], stop_at_layer=LAYER + 1)
    return bank["res", LAYER].encode(resid[:, position])


# ------------------------------------------------------------------------------ the bank
def test_a_transcoder_serves_the_mlp_site_and_matches_like_its_twin(model):
    tc_bank, twin_bank = _banks()
    assert tc_bank.transcoder_keys == [("mlp", LAYER)] and "1 mlp transcoder)" in tc_bank.describe()
    assert (tc_bank.read_hook(("mlp", LAYER)), tc_bank.hook(("mlp", LAYER))) == (IN_HOOK, OUT_HOOK)
    assert tc_bank.read_hook(("res", LAYER)) == tc_bank.hook(("res", LAYER)) == RES_HOOK
    assert torch.equal(tc_bank.decoder("mlp", LAYER), twin_bank.decoder("mlp", LAYER))    # no model needed
    a = ff.FlowTracer(tc_bank, model, contexts=None).match(("mlp", LAYER), ("res", LAYER), k=3)
    b = ff.FlowTracer(twin_bank, model, contexts=None).match(("mlp", LAYER), ("res", LAYER), k=3)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)


def test_a_list_keys_a_transcoder_by_its_output_hook_and_banks_save_and_load(tmp_path):
    tc = _transcoder("skip")
    bank = SAEBank([make_sae("res", LAYER), tc])
    assert list(bank) == [("res", LAYER), ("mlp", LAYER)] and bank["mlp", LAYER] is tc
    loaded = SAEBank.load(bank.save(tmp_path / "bank"))
    assert isinstance(loaded["mlp", LAYER], SkipTranscoder) and loaded.transcoder_keys == [("mlp", LAYER)]
    assert loaded.fingerprint() == bank.fingerprint()
    assert torch.equal(loaded["mlp", LAYER].W_skip, tc.W_skip)


@pytest.mark.parametrize("kind", ["plain", "skip"])
def test_activations_are_the_encoder_on_the_input_hook_and_the_model_is_unchanged(model, tokens, kind):
    tc_bank, _ = _banks(kind)
    clean = model(tokens)
    logits, acts = model.run_with_features(tokens, bank=tc_bank, sites=["mlp"])
    sae = tc_bank["mlp", LAYER]
    assert acts["mlp", LAYER].shape == (*tokens.shape, D_SAE)
    torch.testing.assert_close(acts["mlp", LAYER], sae.encode(_input(model, tokens)), atol=0, rtol=0)
    torch.testing.assert_close(logits, clean)
    assert IN_HOOK in model.hook_dict and not model.hook_dict[IN_HOOK].fwd_hooks    # the input keeper is gone
    assert not model.acts_to_saes


def test_editing_the_spliced_features_writes_their_decoder_rows_at_hook_mlp_out(model, tokens):
    tc_bank, _ = _banks()
    sae = tc_bank["mlp", LAYER]
    a = sae.encode(_input(model, tokens))[..., 4]

    def zero(acts, hook):
        acts = acts.clone()
        acts[..., 4] = 0
        return acts

    with model.attached(tc_bank.select(sites=["mlp"])):
        _, cache = model.run_with_cache(tokens, names_filter=[RES_HOOK])
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"{OUT_HOOK}.hook_sae_acts_post", zero)],
                                      stop_at_layer=LAYER + 1)
    torch.testing.assert_close(edited, cache[RES_HOOK] - a[..., None] * sae.W_dec[4], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kind", ["plain", "skip"])
def test_deactivation_at_hook_mlp_out_is_the_subtraction_by_hand(model, tokens, kind):
    tc_bank, _ = _banks(kind)
    text = tokens[:1]
    cases = ((0, 3, 0.0), (5, 7, 0.0), (9, 4, -1.5))
    items = [[Intervention("mlp", LAYER, (f,), (p,), r)] for f, p, r in cases]
    positions = [p for _, p, _ in cases]
    expected = torch.cat([_by_hand(model, tc_bank, text, (f,), p, r) for f, p, r in cases])
    for layer_local in (True, False):
        got = res_activations(model, tc_bank, text, LAYER, positions, items, layer_local=layer_local)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # r = 1 changes nothing, bit for bit
    same = res_activations(model, tc_bank, text, LAYER, [3], [[Intervention("mlp", LAYER, (0,), (3,), 1.0)]],
                           layer_local=False)
    assert torch.equal(same, res_activations(model, tc_bank, text, LAYER, [3], [[]], layer_local=False))


def test_validation_rows_match_a_by_hand_deactivation(model, tokens):
    tc_bank, _ = _banks(with_prev=False)              # mlp(L) is the only predecessor site: rows deactivate it
    report = ff.FlowTracer(tc_bank, model, contexts=None).validate(
        tokens, layers=[LAYER], methods=["top1", "attribution"], positions_per_text=4, progress=False)
    rows = [row for row in report.rows if row.deactivated]
    assert rows and {row.method for row in rows} == {"top1", "attribution"}
    for row in rows[:3]:
        refs = [ff.FeatureRef.parse(ref) for ref in row.deactivated]
        assert {ref.key for ref in refs} == {("mlp", LAYER)}
        target = ff.FeatureRef.parse(row.target)
        z = _by_hand(model, tc_bank, tokens[row.text:row.text + 1], [ref.index for ref in refs], row.position, row.r)
        assert row.z_new == pytest.approx(float(z[0, target.index]), abs=1e-4)
    split = split_preactivations(model, tc_bank, tokens[:1], layer=LAYER, position=5, targets=[0, 1, 2])
    torch.testing.assert_close(split.total(), split.pre, atol=1e-4, rtol=0)       # the transcoder's part is exact
    a = tc_bank["mlp", LAYER].encode(_input(model, tokens[:1]))[0, 5]
    assert split.indices["mlp"].tolist() == (a > 0).nonzero().squeeze(1).tolist()


# ------------------------------------------------------------------------------ steering
def test_steering_adds_equal_those_of_an_mlp_out_sae_with_the_same_decoder(model, tokens):
    tc_bank, twin_bank = _banks()
    ref = ff.FeatureRef(LAYER, "mlp", 6)
    for scale in ("unit", "decoder"):
        out = []
        for bank in (tc_bank, twin_bank):
            with ff.Steerer(model, bank, scale=scale).add(ref, 3.0):
                out.append(model(tokens))
        assert torch.equal(out[0], out[1])
    assert not torch.allclose(out[0], model(tokens), atol=1e-3)
    prompt, kwargs = tokens[:1, :4], dict(max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
    steered = []
    for bank in (tc_bank, twin_bank):
        with ff.Steerer(model, bank, scale="unit", positions="generated").add(ref, 8.0):
            steered.append(model.generate(prompt, **kwargs))
    assert torch.equal(steered[0], steered[1])


def test_a_rescale_reads_the_input_hook_and_edits_hook_mlp_out(model, tokens):
    tc_bank, _ = _banks()
    sae = tc_bank["mlp", LAYER]
    a = sae.encode(_input(model, tokens))[..., 2]
    _, cache = model.run_with_cache(tokens, names_filter=[RES_HOOK])
    expected = cache[RES_HOOK] + (3.0 - 1.0) * a[..., None] * sae.W_dec[2]
    ref = ff.FeatureRef(LAYER, "mlp", 2)
    with ff.Steerer(model, tc_bank, scale="unit").rescale(ref, 3.0):
        free = model.run_with_cache(tokens, names_filter=[RES_HOOK])[1][RES_HOOK]
    torch.testing.assert_close(free, expected, atol=1e-5, rtol=0)
    with model.attached(tc_bank.select(sites=["mlp"])), ff.Steerer(model, tc_bank, scale="unit").rescale(ref, 3.0):
        spliced = model.run_with_cache(tokens, names_filter=[RES_HOOK])[1][RES_HOOK]   # at hook_sae_output
    torch.testing.assert_close(spliced, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["plain", "skip"])
def test_preflight_measures_a_transcoder_from_its_input_against_hook_mlp_out(model, tokens, kind):
    from tl_featureflow.saes.preflight import preflight
    from tl_featureflow.saes.quality import evaluate_bank

    tc_bank, _ = _banks(kind, with_prev=False)
    sae = tc_bank["mlp", LAYER]
    _, cache = model.run_with_cache(tokens, names_filter=[IN_HOOK, OUT_HOOK])
    y = cache[OUT_HOOK][:, 1:].flatten(0, 1).double()
    recon = sae(cache[IN_HOOK][:, 1:]).detach().flatten(0, 1).double()        # a skip transcoder's W_skip path included
    fvu = float(((y - recon) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    row = next(r for r in preflight(model, tc_bank, tokens, on_fail="ignore").rows if r.key == ("mlp", LAYER))
    assert row.hook == OUT_HOOK and row.fvu == pytest.approx(fvu, rel=1e-4)
    quality = next(q for q in evaluate_bank(model, tc_bank, tokens, loss_rows=2, progress=False).rows
                   if q.site == "mlp")
    assert quality.ce_spliced is not None and quality.ce_spliced != quality.ce_clean


# ------------------------------------------------------------------------------ refusals
def test_cross_layer_and_multi_layer_transcoders_are_refused():
    cross = _transcoder(hook="blocks.0.ln2.hook_normalized")                        # layer 0 in, layer 1 out
    with pytest.raises(TranscoderError, match=r"for \('mlp', 1\) reads 'blocks\.0\.ln2.*cross-layer.*single-layer"):
        SAEBank({("mlp", LAYER): cross})
    with pytest.raises(TranscoderError, match="2 of the list.*cross-layer"):
        SAEBank([make_sae("res", 0), make_sae("res", LAYER), cross])
    several = _transcoder()
    several.cfg.metadata.hook_names_out = [OUT_HOOK, "blocks.2.hook_mlp_out"]
    with pytest.raises(TranscoderError, match="cross-layer"):
        SAEBank({("mlp", LAYER): several})
    stacked = _transcoder()
    stacked.W_dec = torch.nn.Parameter(torch.randn(D_SAE, 2, D_MODEL))             # a decoder per layer written
    with pytest.raises(TranscoderError, match=r"decoder of shape \(40, 2, 32\).*cross-layer"):
        SAEBank({("mlp", LAYER): stacked})
    assert issubclass(TranscoderError, FeatureFlowError)


def test_transcoders_on_hooks_we_do_not_serve_are_refused_naming_transcoders():
    with pytest.raises(TranscoderError, match=r"transcoder for \('mlp', 1\) reads 'blocks\.1\.hook_resid_pre'.*"
                                              r"mlp site only.*ln2\.hook_normalized"):
        SAEBank({("mlp", LAYER): _transcoder(hook="blocks.1.hook_resid_pre")})
    with pytest.raises(TranscoderError, match="writes 'blocks.1.hook_resid_post'.*transcoders at the mlp site"):
        SAEBank({("mlp", LAYER): _transcoder(out=RES_HOOK)})
    with pytest.raises(TranscoderError, match=r"for \('res', 1\) is a transcoder.*mlp site only"):
        SAEBank({("res", LAYER): _transcoder()})
    with pytest.raises(TranscoderError, match=r"expected layer 2's MLP"):
        SAEBank({("mlp", 2): _transcoder()})


def test_transcoders_of_the_wrong_width_or_a_missing_input_hook_are_refused(model, tokens):
    with pytest.raises(TranscoderError, match=r"for \('mlp', 1\) maps d_in 32 to d_out 16"):
        SAEBank({("mlp", LAYER): _transcoder(d_out=16)})
    narrow = SAEBank({("mlp", LAYER): _transcoder(d_in=16, d_out=16)})
    with pytest.raises(ModelMismatchError, match="d_in=16 but the model has d_model=32"):
        model.run_with_features(tokens, bank=narrow)
    hooked = HookedTransformer(tiny_cfg()).eval()
    mlp_in = SAEBank({("mlp", LAYER): _transcoder(hook=f"blocks.{LAYER}.hook_mlp_in")})
    with pytest.raises(ModelMismatchError, match=r"reads 'blocks\.1\.hook_mlp_in'.*set_use_hook_mlp_in\(True\)"):
        mlp_in.bind(hooked)
    sae_lens_hook = SAEBank({("mlp", LAYER): _transcoder(hook=f"blocks.{LAYER}.mlp.hook_in")})
    with pytest.raises(ModelMismatchError, match="no hook 'blocks.1.mlp.hook_in'.*HookedSAETransformer"):
        ff.Steerer(hooked, sae_lens_hook, scale="unit")
    # SAELens's hook exists on a FlowTransformer: it reads the MLP's input like ln2.hook_normalized
    _, acts = model.run_with_features(tokens, bank=sae_lens_hook)
    torch.testing.assert_close(acts["mlp", LAYER], sae_lens_hook["mlp", LAYER].encode(_input(model, tokens)))


# ------------------------------------------------------------------------------ from_pretrained
@pytest.fixture
def local_gemma_scope_transcoders(tmp_path, monkeypatch):
    """Serve Gemma Scope's transcoder files (``params.npz``: w_enc, w_dec, b_enc, b_dec, threshold) from local
    files to SAELens's real loader, as ``tests/saes/test_bank.py::local_gemma_scope`` does for its SAEs: only
    the download and the (huge) real widths are replaced."""
    import sae_lens.loading.pretrained_sae_loaders as loaders
    import sae_lens.saes.sae as sae_module

    served: list[tuple[str, str]] = []

    def fake_download(repo_id, filename, subfolder=None, **kw):
        path = tmp_path / repo_id / (subfolder or "") / filename
        if not path.exists():
            rng = np.random.default_rng(len(served))
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, w_enc=rng.normal(size=(D_MODEL, D_SAE)).astype(np.float32),
                     w_dec=rng.normal(size=(D_SAE, D_MODEL)).astype(np.float32),
                     b_enc=rng.normal(size=D_SAE).astype(np.float32), b_dec=np.zeros(D_MODEL, np.float32),
                     threshold=np.abs(rng.normal(size=D_SAE)).astype(np.float32))
        served.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(loaders, "hf_hub_download", fake_download)
    monkeypatch.setattr(sae_module, "get_config_overrides",
                        lambda release, sae_id: {"d_in": D_MODEL, "d_out": D_MODEL, "d_sae": D_SAE})
    return served


def test_from_pretrained_loads_gemma_scope_transcoders_through_sae_lens(local_gemma_scope_transcoders, model, tokens):
    from sae_lens import JumpReLUTranscoder

    bank = SAEBank.from_pretrained("gemma-scope-2b-pt-transcoders", ["layer_1/width_16k/average_l0_65"],
                                   progress=False)
    sae = bank["mlp", LAYER]
    assert isinstance(sae, JumpReLUTranscoder) and list(bank) == [("mlp", LAYER)]
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out) == (IN_HOOK, OUT_HOOK)
    assert local_gemma_scope_transcoders == [("google/gemma-scope-2b-pt-transcoders",
                                              "layer_1/width_16k/average_l0_65/params.npz")]
    _, acts = model.run_with_features(tokens, bank=bank)
    torch.testing.assert_close(acts["mlp", LAYER], sae.encode(_input(model, tokens)))
    templated = SAEBank.from_pretrained({"mlp": "gemma-scope-2b-pt-transcoders"}, "layer_{layer}/width_16k/average_l0_65",
                                        layers=[LAYER], progress=False)
    assert templated.transcoder_keys == [("mlp", LAYER)]


def test_from_pretrained_refuses_cross_layer_transcoders_before_any_download(local_gemma_scope_transcoders):
    with pytest.raises(TranscoderError, match="cross-layer transcoder.*summing the decoders"):
        SAEBank.from_pretrained("mntss-gemma-2-2b-2.5m-clt-as-per-layer", ["layer_0"], progress=False)
    with pytest.raises(ff.errors.BankError, match=r"writes 'blocks\.1\.hook_mlp_out'.*not the \('res', 1\)"):
        SAEBank.from_pretrained({"res": "gemma-scope-2b-pt-transcoders"}, "layer_{layer}/width_16k/average_l0_65",
                                layers=[LAYER], progress=False)
    assert local_gemma_scope_transcoders == []

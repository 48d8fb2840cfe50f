"""Shared, session-scoped data fixtures: a small slice of the Shakespeare corpus, a BPE trained on it, its dataset."""

from pathlib import Path

import pytest

from xlstm_megatron.data.corpus import iter_shakespeare_documents, write_jsonl
from xlstm_megatron.data.tokenizer import TokenizerSpec, train_bpe_tokenizer

SMALL_VOCAB = 512
# Texts a lossless tokenizer must survive besides the plays: non-ASCII, emoji, whitespace runs, control characters,
# CRLF, a lone combining mark and the EOD token's own text.
EDGE_TEXTS = [
    "Thou art   a scholar;\tspeak to it,\r\nHoratio.",
    "Æsop’s “fables” — naïve café, Ångström, 日本語, Ελληνικά, עברית 🙂👍🏽",
    "  leading and trailing spaces  \n\n\n",
    "\x00\x01\x7f control \u0301 combining",
    "before <|endoftext|> after",
]


@pytest.fixture(scope="session")
def edge_texts() -> list[str]:
    return list(EDGE_TEXTS)


@pytest.fixture(scope="session")
def small_vocab() -> int:
    return SMALL_VOCAB


@pytest.fixture(scope="session")
def small_docs() -> list[str]:
    """Documents of the first two plays (~230 kB, ~30 documents) plus the edge texts."""
    return [r["text"] for r in iter_shakespeare_documents(max_plays=2)] + EDGE_TEXTS


@pytest.fixture(scope="session")
def small_jsonl(tmp_path_factory, small_docs) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    return write_jsonl(({"text": t, "n": i} for i, t in enumerate(small_docs)), path)


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory, small_docs) -> Path:
    return train_bpe_tokenizer(small_docs, SMALL_VOCAB, tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="session")
def bpe_spec(bpe_dir) -> TokenizerSpec:
    return TokenizerSpec("HuggingFaceTokenizer", tokenizer_model=str(bpe_dir))


@pytest.fixture(scope="session")
def bpe(bpe_spec):
    return bpe_spec.load()

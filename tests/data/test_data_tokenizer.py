"""Tokenizers: lossless byte-level BPE, the same ids through every loader, one-line errors for bad input."""

import json

import pytest

from xlstm_megatron.data.errors import DataConfigError
from xlstm_megatron.data.tokenizer import (
    EOD_TOKEN,
    TokenizerSpec,
    check_tokenizer_matches_model,
    load_tokenizer,
    train_bpe_tokenizer,
)


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_trained_bpe_is_lossless_on_corpus_and_edge_texts(bpe, small_docs, small_vocab):
    assert bpe.vocab_size == small_vocab
    assert bpe.eod_id == 0
    for text in small_docs:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    # BPE merges compress: fewer tokens than bytes on real text.
    text = small_docs[0]
    assert len(bpe.encode(text)) < 0.6 * len(text.encode())


def test_every_loader_gives_the_same_ids(bpe, bpe_dir, tmp_path, edge_texts, small_docs):
    from tokenizers import Tokenizer

    from_file = load_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(bpe_dir / "tokenizer.json"))
    Tokenizer.from_file(str(bpe_dir / "tokenizer.json")).model.save(str(tmp_path))  # vocab.json + merges.txt
    gpt2 = load_tokenizer(
        "GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"), merge_file=str(tmp_path / "merges.txt")
    )
    assert (gpt2.vocab_size, gpt2.eod_id) == (bpe.vocab_size, bpe.eod_id)
    for text in edge_texts + small_docs[:3]:
        ids = bpe.encode(text)
        assert from_file.encode(text) == ids
        assert gpt2.encode(text) == ids
        assert gpt2.decode(ids) == text


def test_trained_dir_loads_in_transformers_and_stock_megatron(bpe, bpe_dir, small_docs, edge_texts):
    from megatron.core.tokenizers import MegatronTokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bpe_dir))
    mt = MegatronTokenizer.from_pretrained(str(bpe_dir))  # reads tokenizer_metadata.json
    assert hf.eos_token == EOD_TOKEN and len(hf) == bpe.vocab_size
    assert (mt.vocab_size, mt.eod) == (bpe.vocab_size, bpe.eod_id)
    for text in edge_texts + small_docs[:2]:
        ids = bpe.encode(text)
        assert hf(text).input_ids == ids
        assert mt.tokenize(text) == ids
        assert mt.detokenize(ids) == text


def test_megatron_dataset_attributes(bpe):
    assert bpe.eod == bpe.eos == bpe.eod_id
    assert bpe.pad == -1
    ident = bpe.unique_identifiers
    json.dumps(ident)  # hashed into Megatron's cache names: must serialise
    assert ident == load_tokenizer("HuggingFaceTokenizer", tokenizer_model=bpe.spec.tokenizer_model).unique_identifiers


def test_null_tokenizer():
    tok = load_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod_id) == (100, 99)
    assert tok.encode("5 7 98") == [5, 7, 98]
    assert tok.decode([5, 7, 98]) == "5 7 98"


def test_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = "\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200))
    (tmp_path / "train.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=40, eos_id=2
    )
    tok = load_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    assert (tok.vocab_size, tok.eod_id) == (40, 2)
    assert tok.decode(tok.encode("the lazy dog jumps")) == "the lazy dog jumps"


def test_check_tokenizer_matches_model(bpe):
    check_tokenizer_matches_model(bpe, bpe.vocab_size)
    check_tokenizer_matches_model(bpe, bpe.vocab_size + 128)
    with pytest.raises(DataConfigError) as e:
        check_tokenizer_matches_model(bpe, bpe.vocab_size - 1)
    assert str(bpe.vocab_size) in _one_line_error(e)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"tokenizer_type": "Bogus"}, "unknown tokenizer type"),
        ({"tokenizer_type": "HuggingFaceTokenizer"}, "--tokenizer-model"),
        ({"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "/nonexistent/tok.json"}, "does not exist"),
        ({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "__FILE__"}, "--merge-file"),
        ({"tokenizer_type": "NullTokenizer"}, "--vocab-size"),
    ],
)
def test_bad_tokenizer_arguments_are_one_line_errors(tmp_path, kwargs, needle):
    kwargs = {k: (str(tmp_path) if v == "__FILE__" else v) for k, v in kwargs.items()}
    with pytest.raises(DataConfigError) as e:
        TokenizerSpec(**kwargs).load()
    assert needle in _one_line_error(e)


def test_dir_without_tokenizer_json_and_unknown_eod(tmp_path, bpe_dir):
    with pytest.raises(DataConfigError) as e:
        load_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert "GPT2BPETokenizer" in _one_line_error(e)
    with pytest.raises(DataConfigError) as e:
        load_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(bpe_dir), eod_token="<nope>")
    assert "<nope>" in _one_line_error(e)


def test_training_refuses_bad_vocab_and_existing_output(bpe_dir):
    before = (bpe_dir / "tokenizer.json").read_bytes()
    with pytest.raises(DataConfigError) as e:
        train_bpe_tokenizer(["some text"], 100, bpe_dir / "other")
    assert "257" in _one_line_error(e)
    with pytest.raises(DataConfigError) as e:
        train_bpe_tokenizer(["some text"], 300, bpe_dir)
    assert "--overwrite" in _one_line_error(e)
    assert (bpe_dir / "tokenizer.json").read_bytes() == before
    assert not (bpe_dir / "other").exists()

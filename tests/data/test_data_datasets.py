"""GPT datasets through Megatron's builder: exact sample contents, split sizes, blends, mock data, input checks."""

import json

import numpy as np
import pytest
import torch

from xlstm_megatron.data.corpus import iter_shakespeare_documents, write_jsonl
from xlstm_megatron.data.datasets import build_gpt_datasets, default_is_built_on_rank, parse_data_path
from xlstm_megatron.data.errors import DataConfigError
from xlstm_megatron.data.preprocess import preprocess_files
from xlstm_megatron.data.tokenizer import load_tokenizer

S = 64


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, small_jsonl, bpe_spec):
    """Two datasets with the same tokenizer: the small corpus (A) and the third play (B)."""
    root = tmp_path_factory.mktemp("ds")
    third = list(iter_shakespeare_documents(max_plays=3))[len(list(iter_shakespeare_documents(max_plays=2))) :]
    b_jsonl = write_jsonl(third, root / "b.jsonl")
    a = preprocess_files([small_jsonl], root / "a", bpe_spec, append_eod=True).prefixes["text"]
    b = preprocess_files([b_jsonl], root / "b", bpe_spec, append_eod=True).prefixes["text"]
    return a, b


def _docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].astype(np.int64) for i in range(len(ds))]


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("seed", [0, 7])
def test_samples_are_windows_of_the_shuffled_document_stream(prefixes, bpe, tmp_path, seed):
    prefix = prefixes[0]
    docs = _docs(prefix)
    train, valid, test = build_gpt_datasets(
        bpe, seq_length=S, data_path=[prefix], split="90,10,0", seed=seed, cache_dir=str(tmp_path)
    )
    assert test is None
    n_train = round(0.9 * len(docs))
    # Megatron splits by document: train gets the first 90 %, valid the rest.
    assert sorted(set(train.document_index.tolist())) == list(range(n_train))
    assert sorted(set(valid.document_index.tolist())) == list(range(n_train, len(docs)))
    train_tokens = sum(len(d) for d in docs[:n_train])
    assert len(train) == (train_tokens - 1) // S  # one epoch, last partial sample dropped
    stream = np.concatenate([docs[i] for i in train.document_index])
    for j in range(0, len(train), 7):
        sample = train[j]
        k = int(train.shuffle_index[j])
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert sample["tokens"].shape == sample["labels"].shape == (S,)
        assert sample["tokens"].dtype == sample["labels"].dtype == sample["position_ids"].dtype == torch.int64
        np.testing.assert_array_equal(sample["tokens"].numpy(), stream[k * S : (k + 1) * S])
        np.testing.assert_array_equal(sample["labels"].numpy(), stream[k * S + 1 : (k + 1) * S + 1])
        assert sample["loss_mask"].eq(1).all() and sample["position_ids"].tolist() == list(range(S))


def test_more_samples_than_one_epoch_repeat_documents(prefixes, bpe, tmp_path):
    one_epoch, _, _ = build_gpt_datasets(bpe, seq_length=S, data_path=prefixes[1], split="100,0,0",
                                         cache_dir=str(tmp_path))  # fmt: skip
    want = 3 * len(one_epoch) + 5
    train, valid, _ = build_gpt_datasets(bpe, seq_length=S, data_path=prefixes[1], split="100,0,0",
                                         num_samples=[want, 0, 0], cache_dir=str(tmp_path))  # fmt: skip
    assert valid is None
    assert len(train) >= want
    assert len(train.document_index) == 4 * len(one_epoch.document_index)


def test_eod_mask_and_attention_mask_options(prefixes, bpe, tmp_path):
    train, _, _ = build_gpt_datasets(bpe, seq_length=S, data_path=prefixes[0], split="100,0,0", eod_mask_loss=True,
                                     create_attention_mask=True, cache_dir=str(tmp_path))  # fmt: skip
    for j in range(0, len(train), 25):
        s = train[j]
        np.testing.assert_array_equal(s["loss_mask"].numpy(), (s["tokens"] != bpe.eod_id).float().numpy())
    assert s["attention_mask"].shape == (1, S, S) and s["attention_mask"].dtype == torch.bool


def test_weighted_blend_follows_weights(prefixes, bpe, tmp_path):
    a, b = prefixes
    train, valid, test = build_gpt_datasets(bpe, seq_length=S, data_path=f"0.3 {a} 0.7 {b}", split="90,10,0",
                                            num_samples=[200, 20, 0], cache_dir=str(tmp_path))  # fmt: skip
    assert test is None
    assert (len(train), len(valid)) == (200, 20)
    counts = np.bincount([int(train[j]["dataset_id"]) for j in range(len(train))], minlength=2)
    assert abs(counts[0] - 60) <= 1 and abs(counts[1] - 140) <= 1
    assert train[5]["tokens"].shape == (S,)


def test_unweighted_blend_takes_every_sample_once(prefixes, bpe, tmp_path):
    a, b = prefixes
    kwargs = {"seq_length": S, "split": "100,0,0", "cache_dir": str(tmp_path)}
    only_a, only_b = (build_gpt_datasets(bpe, data_path=[p], **kwargs)[0] for p in prefixes)
    train, _, _ = build_gpt_datasets(bpe, data_path=[a, b], **kwargs)
    assert len(train) == len(only_a) + len(only_b)
    counts = np.bincount(np.asarray(train.dataset_index), minlength=2)
    assert counts.tolist() == [len(only_a), len(only_b)]


def test_mock_data():
    tok = load_tokenizer("NullTokenizer", vocab_size=100)
    train, valid, test = build_gpt_datasets(tok, seq_length=32, mock=True, num_samples=[10, 10, 10])
    for ds in (train, valid, test):
        assert type(ds).__name__ == "MockGPTDataset" and len(ds) >= 10
        s = ds[3]
        assert s["tokens"].shape == (32,) and int(s["tokens"].max()) < 100
        np.testing.assert_array_equal(s["tokens"][1:].numpy(), s["labels"][:-1].numpy())


def test_parse_data_path():
    assert parse_data_path("a b") == (["a", "b"], None)
    assert parse_data_path(["30", "a", "70", "b"]) == (["a", "b"], [30.0, 70.0])
    assert parse_data_path("a") == (["a"], None)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"data_path": "{missing}"}, "xlstm-megatron preprocess"),
        ({"data_path": "{a}.bin"}, "drop the .bin suffix"),
        ({"data_path": "{a}", "model_vocab_size": 100}, "exceeds the model's vocab size"),
        ({"data_path": "{a}", "mock": True}, "not both"),
        ({}, "--mock-data"),
        ({"data_path": "1 {a} 2 {b}"}, "number of train samples"),
        ({"data_path": "0.5 {a} {b}"}, "mixes weights and prefixes"),
        ({"data_path": "{a}", "split": "90;x"}, "--split"),
        ({"data_path": "{tiny}", "split": "99,1,0"}, "valid split"),
        ({"data_path": "{a}", "seq_length": 0}, "seq_length"),
    ],
)
def test_bad_input_is_a_one_line_error_before_any_work(prefixes, bpe, tmp_path, kwargs, needle):
    tiny_jsonl = tmp_path / "tiny.jsonl"
    tiny_jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one document", "two documents"]))
    tiny = preprocess_files([tiny_jsonl], tmp_path / "tiny", bpe.spec).prefixes["text"]
    names = {"a": prefixes[0], "b": prefixes[1], "missing": str(tmp_path / "missing_text_document"), "tiny": tiny}
    if "data_path" in kwargs:
        kwargs["data_path"] = kwargs["data_path"].format(**names)
    kwargs = {"seq_length": S, "cache_dir": str(tmp_path / "cache"), **kwargs}
    with pytest.raises(DataConfigError) as e:
        build_gpt_datasets(bpe, **kwargs)
    assert needle in _one_line(e)
    assert not (tmp_path / "cache").exists()


def test_single_process_builds_on_this_rank():
    assert default_is_built_on_rank()

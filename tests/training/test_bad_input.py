"""Bad input to `xlstm-megatron train` (and `generate`) fails before any work: exit status 2, exactly one `error:`
line on stderr naming the fix, no traceback, and nothing written or touched.

The command's own entry (`xlstm_megatron.cli.main`, what `python -m xlstm_megatron.cli` runs) is called in this
process: every case stops in the checks before a process starts, so there is no process to start and each case
takes about a second. `test_through_the_console_entry` runs one case as a real subprocess; the checkpoint cases use
one real checkpoint that `xlstm-megatron train` writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

MODEL = dict(xlstm_block="v1", num_layers=2, hidden_size=32, num_attention_heads=2, xlstm_pattern="ms",
             slstm_num_heads=2, mlstm_chunk_size=8)
TRAIN = dict(mock_data=True, tokenizer_type="NullTokenizer", vocab_size=64, seq_length=16, micro_batch_size=2,
             train_iters=1, lr=1e-3, lr_warmup_iters=0, eval_iters=0, eval_interval=1, log_progress=False)


def _have_mamba_ssm() -> bool:
    from xlstm_megatron.layers.mamba import have_mamba_ssm

    return have_mamba_ssm()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _config(tmp: Path, model: dict, train: dict) -> list[str]:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": model, "train": train}))
    return ["--config", str(path)]


def _fails_once(capfd, tmp: Path, *argv: str, command: str = "train") -> str:
    """Run the command in this process; assert rc 2, one `error:` line, no traceback, nothing written under tmp."""
    from xlstm_megatron.cli import main

    before = _snapshot(tmp)
    rc = main([command, *argv])
    out, err = capfd.readouterr()
    assert rc == 2, (out[-2000:], err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err + out
    assert _snapshot(tmp) == before  # nothing written, moved or touched
    return lines[0]


def _write_indexed(prefix: Path, docs: list[list[int]]) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("data") / "d_text_document"
    _write_indexed(prefix, [list(range(1, 41)), list(range(5, 45)), list(range(2, 60))])
    return prefix


def _with_data(tmp: Path, source: Path, damage: str) -> Path:
    """A copy of the data prefix, damaged."""
    prefix = tmp / "data" / source.name
    prefix.parent.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(str(source) + ext, str(prefix) + ext)
    idx, bin_ = Path(str(prefix) + ".idx"), Path(str(prefix) + ".bin")
    if damage == "truncated idx":
        idx.write_bytes(idx.read_bytes()[:-9])
    elif damage == "idx header":
        idx.write_bytes(b"not an index at all" + idx.read_bytes()[19:])
    elif damage == "truncated bin":
        bin_.write_bytes(bin_.read_bytes()[:-12])
    return prefix


NO_MOCK = {k: v for k, v in TRAIN.items() if k != "mock_data"}


@pytest.mark.parametrize("model,train,flags,match", [
    ({**MODEL, "hiden_size": 64}, TRAIN, (), "unknown key 'hiden_size'; did you mean 'hidden_size'?"),
    (MODEL, {**TRAIN, "micro_bach_size": 4}, (), "did you mean 'micro_batch_size'"),
    (MODEL, NO_MOCK, ("--data-path", "/nonexistent/corpus_text_document"), "xlstm-megatron preprocess"),
    (MODEL, TRAIN, ("--tensor-model-parallel-size", "2", "--nproc", "3"), "world size (3) is not divisible"),
    ({**MODEL, "hidden_size": 48, "num_attention_heads": 3, "slstm_num_heads": 3}, TRAIN,
     ("--tensor-model-parallel-size", "2", "--nproc", "2"),
     "num_attention_heads (3) must be a multiple of tensor_model_parallel_size (2)"),
    ({**MODEL, "slstm_num_heads": 1}, TRAIN, ("--tensor-model-parallel-size", "2", "--nproc", "2"),
     "slstm_num_heads=1 is not divisible by tensor_model_parallel_size=2"),
    (MODEL, {**TRAIN, "global_batch_size": 5}, (), "must be divisible by"),
    (MODEL, {**TRAIN, "train_iters": 4, "lr_warmup_iters": 4}, (), "lower --lr-warmup-iters"),
    (MODEL, {**TRAIN, "eval_interval": None}, (), "--eval-interval is unset"),
    ({**MODEL, "xlstm_pattern": "mx"}, TRAIN, (), "unknown symbols"),
    (MODEL, TRAIN, ("--micro-batch-sizes", "4"), "unrecognized arguments: --micro-batch-sizes 4 (closest: "
     "--micro-batch-sizes -> --micro-batch-size)"),
    (MODEL, TRAIN, ("--context-parallel-size", "2", "--nproc", "2"),
     "--context-parallel-size 2: sLSTM layers ('s') cannot be split over the sequence"),
    ({**MODEL, "xlstm_pattern": "m*"}, TRAIN, ("--context-parallel-size", "2", "--nproc", "2"),
     "attention layers ('*') have context parallelism only in Transformer Engine's attention"),
    ({**MODEL, "xlstm_pattern": "mm"}, TRAIN, ("--context-parallel-size", "4", "--nproc", "4"),
     "a CP piece holds 2 tokens (seq length / 2 CP), fewer than the conv's 3-token window"),
    (MODEL, {**TRAIN, "reset_attention_mask": True}, ("--no-create-attention-mask-in-dataloader",),
     "find document starts in the dataloader's attention mask"),
    ({**MODEL, "num_layers": 4, "xlstm_pattern": "mmmm"}, {**TRAIN, "reset_attention_mask": True},
     ("--pipeline-model-parallel-size", "4", "--nproc", "4"), "middle pipeline stages read no batch"),
    pytest.param({**MODEL, "xlstm_pattern": "mM", "mamba_head_dim": 16, "mamba_num_groups": 1}, TRAIN, (),
                 "needs mamba_ssm", marks=pytest.mark.skipif(_have_mamba_ssm(), reason="mamba_ssm imports here")),
], ids=["yaml-key", "yaml-key-train", "missing-data", "world-vs-tp", "heads-vs-tp", "slstm-heads-vs-tp",
        "global-batch", "warmup-ge-decay", "no-eval-interval", "pattern", "unknown-flag", "cp-slstm",
        "cp-local-attention", "cp-short-pieces",
        "packed-without-mask", "packed-middle-stages", "mamba-without-mamba-ssm"])
def test_bad_config_fails_before_start(capfd, tmp_path, model, train, flags, match):
    assert match in _fails_once(capfd, tmp_path, *_config(tmp_path, model, train), *flags)


@pytest.mark.parametrize("damage,match", [
    ("truncated idx", "is truncated or damaged"),
    ("idx header", "does not start with Megatron's index header"),
    ("truncated bin", ".bin is truncated"),
])
def test_damaged_indexed_dataset_fails_before_start(capfd, tmp_path, data, damage, match):
    prefix = _with_data(tmp_path, data, damage)
    line = _fails_once(capfd, tmp_path, *_config(tmp_path, MODEL, NO_MOCK), "--data-path", str(prefix))
    assert match in line and "xlstm-megatron preprocess" in line


def test_split_without_documents_fails_before_start(capfd, tmp_path, data):
    """Megatron's default --split gives valid and test ~3 % and 0.1 % of the documents: none of these three. Megatron
    itself would loop forever counting epochs of an empty split."""
    train = {**NO_MOCK, "eval_iters": 1}
    line = _fails_once(capfd, tmp_path, *_config(tmp_path, MODEL, train), "--data-path", str(data))
    assert "the valid split of" in line and "gets 0 of its 3 documents" in line


def test_intact_indexed_dataset_passes_the_check(data):
    from xlstm_megatron.data.datasets import check_data_prefixes

    check_data_prefixes([str(data)])


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    """A 101-token HF tokenizer directory (as Megatron's HuggingFaceTokenizer loads it)."""
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)} | {"<eod>": 100}, unk_token="w0"))
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eod>"}))
    return root


@pytest.mark.parametrize("flags,match", [
    (("--vocab-size", "64"), "has 101 tokens but --vocab-size is 64"),
    (("--vocab-size", "200"), "--vocab-size 200 is ignored"),
    (("--tokenizer-model", "{tok}/tokenizer.json"), "pass the directory holding tokenizer.json"),
], ids=["tokenizer-larger-than-vocab", "vocab-ignored", "tokenizer-file"])
def test_tokenizer_against_vocab(capfd, tmp_path, hf_tokenizer, flags, match):
    train = {k: v for k, v in TRAIN.items() if k not in ("vocab_size", "tokenizer_type")}
    flags = tuple(f.format(tok=hf_tokenizer) for f in flags)
    argv = [*_config(tmp_path, MODEL, train), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(hf_tokenizer), *flags]
    assert match in _fails_once(capfd, tmp_path, *argv)


# ---- checkpoints ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint (iteration 1) of `xlstm-megatron train`."""
    root = tmp_path_factory.mktemp("ckpt") / "run"
    argv = [sys.executable, "-m", "xlstm_megatron.cli", "train", *_config(root.parent, MODEL, TRAIN),
            "--save", str(root), "--save-interval", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    return root


def _run_copy(checkpoint: Path, tmp: Path, damage: str | None = None) -> Path:
    run = tmp / "run"
    shutil.copytree(checkpoint, run)
    it = run / "iter_0000001"
    if damage == "truncated shard":
        shard = next(it.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "corrupt index":
        (it / ".metadata").write_bytes(os.urandom(64))
    elif damage == "unfinished save":
        (it / "metadata.json").unlink()
    elif damage == "missing shard":
        next(it.glob("*.distcp")).unlink()
    return run


@pytest.mark.parametrize("model,train,match", [
    ({**MODEL, "hidden_size": 64}, {}, "has hidden_size=32 but this run has hidden_size=64"),
    ({**MODEL, "xlstm_pattern": "mm"}, {}, "xlstm_pattern='ms' but this run has xlstm_pattern='mm'"),
    (MODEL, {"vocab_size": 300}, "padded_vocab_size=128 but this run has padded_vocab_size=384"),
], ids=["hidden-size", "pattern", "vocab"])
def test_checkpoint_of_another_model_is_refused_untouched(capfd, tmp_path, checkpoint, model, train, match):
    run = _run_copy(checkpoint, tmp_path)
    argv = [*_config(tmp_path, model, {**TRAIN, **train, "train_iters": 2, "save_interval": 1}), "--save", str(run)]
    assert match in _fails_once(capfd, tmp_path, *argv)


@pytest.mark.parametrize("damage,match", [
    ("truncated shard", "is truncated"),
    ("corrupt index", ".metadata is damaged or truncated"),
    ("unfinished save", "is incomplete (no metadata.json"),
    ("missing shard", "is missing"),
])
@pytest.mark.parametrize("command", ["train", "generate"])
def test_damaged_checkpoint_is_refused_before_start(capfd, tmp_path, checkpoint, damage, match, command):
    run = _run_copy(checkpoint, tmp_path, damage)
    if command == "train":
        argv = [*_config(tmp_path, MODEL, {**TRAIN, "train_iters": 2, "save_interval": 1}), "--save", str(run)]
    else:
        argv = ["--load", str(run), "--prompt", "1 2 3", "--max-new-tokens", "2"]
    assert match in _fails_once(capfd, tmp_path, *argv, command=command)


@pytest.mark.parametrize("flags,match", [
    (("--async-save",), "needs --use-persistent-ckpt-worker"),
    (("--async-save", "--use-persistent-ckpt-worker", "--async-strategy", "mcore"), "needs a GPU"),
], ids=["async-without-worker", "async-on-cpu"])
def test_async_save_that_cannot_run_is_refused(capfd, tmp_path, flags, match):
    import torch

    if torch.cuda.is_available() and match == "needs a GPU":
        pytest.skip("a GPU is present")
    argv = [*_config(tmp_path, MODEL, {**TRAIN, "save_interval": 1}), "--save", str(tmp_path / "run"), *flags]
    assert match in _fails_once(capfd, tmp_path, *argv)


def test_through_the_console_entry(tmp_path, checkpoint):
    """The same refusal through `python -m xlstm_megatron.cli` (a real process, as users run it)."""
    run = _run_copy(checkpoint, tmp_path, "truncated shard")
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "xlstm_megatron.cli", "generate", "--load", str(run)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: checkpoint shard") and "Traceback" not in proc.stderr
    assert _snapshot(tmp_path) == before

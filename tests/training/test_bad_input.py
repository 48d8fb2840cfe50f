"""Bad input to `xlstm-megatron train` fails before any work with one `error:` line naming the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MODEL = dict(xlstm_block="v1", num_layers=2, hidden_size=32, num_attention_heads=2, xlstm_pattern="ms",
             slstm_num_heads=2, mlstm_chunk_size=8)
TRAIN = dict(mock_data=True, vocab_size=64, seq_length=16, micro_batch_size=2, train_iters=1, lr_warmup_iters=0,
             eval_interval=0, progress_bar=False)


def _run(tmp: Path, model: dict, train: dict, *flags: str) -> subprocess.CompletedProcess:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": model, "train": train}))
    return subprocess.run([sys.executable, "-m", "xlstm_megatron.cli", "train", "--config", str(path), *flags],
                          capture_output=True, text=True, timeout=240)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("model,train,flags,match", [
    ({**MODEL, "hiden_size": 64}, TRAIN, (), "did you mean 'hidden_size'"),
    (MODEL, {**TRAIN, "micro_bach_size": 4}, (), "did you mean 'micro_batch_size'"),
    (MODEL, {k: v for k, v in TRAIN.items() if k != "mock_data"}, ("--data-path", "/nonexistent/corpus_text_document"),
     "corpus_text_document"),
    (MODEL, TRAIN, ("--tensor-model-parallel-size", "2", "--nproc", "3"), "multiple of 2"),
    ({**MODEL, "xlstm_pattern": "mx"}, TRAIN, (), "unknown symbols"),
    (MODEL, {**TRAIN, "seq_length": 15}, ("--fp8", "hybrid"),
     "tokens per rank (sequence 15 x micro batch 2) divisible by 8"),
    (MODEL, TRAIN, ("--fp8", "hybrid", "--transformer-impl", "local"), "set transformer_impl='transformer_engine'"),
])
def test_bad_config_and_data_fail_fast(tmp_path, model, train, flags, match):
    assert match in _one_error_line(_run(tmp_path, model, train, *flags))


def test_tokenizer_larger_than_model_vocab(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)} | {"<eod>": 100}, unk_token="w0"))
    tok.save(str(tmp_path / "tokenizer.json"))
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "d_text_document.bin"), dtype=np.int32)
    builder.add_document(torch.arange(50, dtype=torch.int32), [50])
    builder.finalize(str(tmp_path / "d_text_document.idx"))
    train = {k: v for k, v in TRAIN.items() if k != "mock_data"}
    proc = _run(tmp_path, MODEL, {**train, "vocab_size": 64}, "--data-path", str(tmp_path / "d_text_document"),
                "--tokenizer-model", str(tmp_path / "tokenizer.json"), "--eod-token", "<eod>")
    assert "vocab_size=64" in _one_error_line(proc)


def test_checkpoint_of_another_architecture_is_refused_untouched(tmp_path):
    save = tmp_path / "ckpt"
    ok = _run(tmp_path, MODEL, {**TRAIN, "save": str(save)})
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = sorted(p.name for p in save.rglob("*"))
    proc = _run(tmp_path, {**MODEL, "hidden_size": 64}, {**TRAIN, "save": str(save), "train_iters": 2})
    assert "different architecture" in _one_error_line(proc)
    assert sorted(p.name for p in save.rglob("*")) == before  # nothing written or overwritten

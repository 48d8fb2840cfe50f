"""A run stopped at iteration N and resumed equals the uninterrupted run bitwise (CLI, PP=2 over 2 gloo ranks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CONFIG = {
    "model": dict(xlstm_block="v1", num_layers=4, hidden_size=32, num_attention_heads=2, slstm_num_heads=2,
                  xlstm_pattern="msms", mlstm_chunk_size=8),
    "train": dict(nproc=2, pipeline_model_parallel_size=2, use_distributed_optimizer=True, mock_data=True,
                  vocab_size=128, seq_length=16, micro_batch_size=2, global_batch_size=8, train_iters=6,
                  lr=3e-3, min_lr=3e-4, lr_warmup_iters=2, eval_interval=3, eval_iters=1, log_interval=1,
                  progress_bar=False),
}


def _train(tmp: Path, name: str, **overrides) -> dict:
    cfg = {"model": CONFIG["model"], "train": {**CONFIG["train"], "save": str(tmp / name), **overrides}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "xlstm_megatron.cli", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / name / "summary.json").read_text())


def test_stop_and_resume_equals_uninterrupted_run_bitwise(tmp_path):
    full = _train(tmp_path, "full")
    first = _train(tmp_path, "resumed", exit_interval=3)
    assert first["iteration"] == 3
    resumed = _train(tmp_path, "resumed")  # same save dir: resumes from its latest checkpoint
    assert resumed["iteration"] == 6
    assert resumed["history"] == full["history"]  # every train and validation loss, as exact floats
    assert resumed["valid_loss"] == full["valid_loss"]
    losses = [loss for _, loss in full["history"]["train"]]
    assert losses[-1] < losses[0]

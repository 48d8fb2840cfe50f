"""`generate_main` on a tiny checkpoint written by `xlstm-megatron train` (mock data, NullTokenizer: ids as text)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tests.megatron.dist import run_distributed
from xlstm_megatron.inference.cli import generate_main

CONFIG = {
    "model": dict(xlstm_block="v1", num_layers=2, hidden_size=32, num_attention_heads=2, slstm_num_heads=2,
                  xlstm_pattern="ms", mlstm_chunk_size=8),
    "train": dict(nproc=1, mock_data=True, vocab_size=128, seq_length=16, micro_batch_size=2, train_iters=2,
                  lr=1e-3, min_lr=1e-4, lr_warmup_iters=0, eval_interval=0, log_interval=1, progress_bar=False),
}
PROMPTS = ["1 2 3", "4"]


def _in_process_reference(run_dir: str) -> tuple[list[list[int]], bool]:
    """Greedy tokens of the loaded checkpoint through `generate`, and whether every weight differs from a fresh
    initialisation (i.e. the checkpoint was really loaded)."""
    from xlstm_megatron.inference import generate
    from xlstm_megatron.inference.loading import load_model, resolve_checkpoint
    from xlstm_megatron.models.xlstm_model import XLSTMModel
    from xlstm_megatron.training.trainer import build_model_config

    source = resolve_checkpoint(run_dir)
    model = load_model(source)
    fresh = XLSTMModel(build_model_config(source.model_kwargs, source.run), source.vocab_size, 16)
    loaded = all(not torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))
    prompts = [[int(t) for t in p.split()] for p in PROMPTS]
    return generate(model, prompts, 6, temperature=0, vocab_limit=128).tokens, loaded


def test_generate_cli_continues_prompts_from_a_trained_checkpoint(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    cfg = {"model": CONFIG["model"], "train": {**CONFIG["train"], "save": str(run_dir)}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "xlstm_megatron.cli", "train", "--config", str(tmp_path / "cfg.yaml")]
    train = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]

    argv = ["--load", str(run_dir), "--max-new-tokens", "6", "--temperature", "0", "--no-stop-at-eod"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    gen = subprocess.run([sys.executable, "-m", "xlstm_megatron.inference.cli", *argv], capture_output=True,
                         text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    printed = [[int(t) for t in line.split()] for line in gen.stdout.strip().splitlines()]

    (reference, loaded) = run_distributed(_in_process_reference, world_size=1, args=(str(run_dir),), timeout=240)[0]
    assert loaded
    assert printed == reference and all(len(tokens) == 6 for tokens in printed)


    # bad input fails before any process starts, with one `error:` line
    tp3 = _error_line(capsys, ["--load", str(run_dir), "--tensor-model-parallel-size", "3"])
    assert "multiple of tensor_model_parallel_size" in tp3
    assert "top_p" in _error_line(capsys, ["--load", str(run_dir), "--top-p", "0"])


def _error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_generate_cli_bad_input_fails_in_one_line(tmp_path: Path, capsys):
    assert "run_config.yaml not found" in _error_line(capsys, ["--load", str(tmp_path / "missing")])

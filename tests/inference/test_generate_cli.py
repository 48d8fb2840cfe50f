"""`generate_main` on a tiny Megatron checkpoint (runs.checkpoint's weights-only format, NullTokenizer: ids as text)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.megatron.dist import run_distributed
from xlstm_megatron.inference.cli import generate_main

MODEL = ["--xlstm-block", "v1", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
         "--slstm-num-heads", "2", "--xlstm-pattern", "ms", "--mlstm-chunk-size", "8"]
VOCAB = 127  # Megatron's NullTokenizer adds the end-of-document id: 128 ids, the model's padded vocab
PROMPTS = ["1 2 3", "4"]


def _save_checkpoint(root: str) -> None:
    """A random tiny v1 model built from Megatron args through runs.model, saved as a Megatron checkpoint."""
    from tests.models.helpers import randomize_tp_invariant
    from xlstm_megatron.runs.args import megatron_args
    from xlstm_megatron.runs.checkpoint import save_weights_checkpoint
    from xlstm_megatron.runs.model import build_xlstm_model

    args = megatron_args([*MODEL, "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "2",
                          "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--transformer-impl",
                          "local"])
    args.padded_vocab_size = VOCAB + 1
    model = build_xlstm_model(args)
    randomize_tp_invariant(model, seed=3)
    save_weights_checkpoint([model], root, 5, args)


def _in_process_reference(run_dir: str) -> tuple[list[list[int]], bool]:
    """Greedy tokens of the loaded checkpoint through `generate`, and whether every weight differs from a fresh
    initialisation (i.e. the checkpoint was really loaded)."""
    from xlstm_megatron.inference import generate
    from xlstm_megatron.inference.loading import load_model, resolve_checkpoint
    from xlstm_megatron.runs.model import build_xlstm_model

    source = resolve_checkpoint(run_dir)
    model = load_model(source)
    fresh = build_xlstm_model(source.args)
    loaded = all(not torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))
    prompts = [[int(t) for t in p.split()] for p in PROMPTS]
    return generate(model, prompts, 6, temperature=0, vocab_limit=VOCAB + 1).tokens, loaded


def test_generate_cli_continues_prompts_from_a_megatron_checkpoint(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    run_distributed(_save_checkpoint, world_size=1, args=(str(run_dir),), timeout=240)
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
    assert "iter_0000009 does not exist" in _error_line(capsys, ["--load", str(run_dir), "--iteration", "9"])


def _error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_generate_cli_bad_input_fails_in_one_line(tmp_path: Path, capsys):
    assert "does not exist; pass the run's --save directory" in _error_line(capsys, ["--load", str(tmp_path / "x")])
    (tmp_path / "plain").mkdir()
    assert "has no checkpoint" in _error_line(capsys, ["--load", str(tmp_path / "plain")])

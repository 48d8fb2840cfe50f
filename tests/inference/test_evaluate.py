"""Position-wise loss (`inference.position_loss`) and `xlstm-megatron evaluate`: the per-position loss equals an
independently computed full forward's per-token cross-entropy (whole window, and segments carrying the recurrent
state), for an xLSTM and the Transformer baseline; a checkpoint of a tiny `xlstm-megatron train` run evaluates at 4x
its training length through the CLI; bad input fails in one line before any work."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.megatron.dist import run_distributed
from xlstm_megatron.inference.evaluate_cli import evaluate_main
from xlstm_megatron.inference.position_loss import PositionLoss, position_buckets

XLSTM = ["--xlstm-block", "v1", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
         "--slstm-num-heads", "2", "--xlstm-pattern", "ms", "--mlstm-chunk-size", "8"]
TRANSFORMER = ["--model-family", "transformer", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
               "2", "--no-rope-fusion"]
TRAIN_LENGTH, VOCAB = 16, 127  # NullTokenizer (megatron-core 0.19): 127 ids, the last end-of-document


def _args(model: list[str]):
    from xlstm_megatron.runs.args import megatron_args

    args = megatron_args([*model, "--seq-length", str(TRAIN_LENGTH), "--max-position-embeddings", str(TRAIN_LENGTH),
                          "--micro-batch-size", "2", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
                          "--transformer-impl", "local"])
    args.padded_vocab_size = VOCAB + 1
    return args


def _random_model(model: list[str]):
    from tests.models.helpers import randomize_tp_invariant
    from xlstm_megatron.runs.model import build_xlstm_model

    args = _args(model)
    net = build_xlstm_model(args)
    randomize_tp_invariant(net, seed=3)
    return args, net.eval()


def _reference_losses(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy from the logits of one plain forward (no labels, no state), computed here."""
    with torch.no_grad():
        logits = model(windows[:, :-1], None, None).float()
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none").view(logits.shape[:2])


def _losses(model: list[str]) -> dict[str, torch.Tensor]:
    from xlstm_megatron.inference.position_loss import token_losses

    _, net = _random_model(model)
    windows = torch.randint(0, VOCAB + 1, (2, 4 * TRAIN_LENGTH + 1), generator=torch.Generator().manual_seed(0))
    out = {"reference": _reference_losses(net, windows), "whole": token_losses(net, windows)}
    if "--xlstm-block" in model:  # 12: not a multiple of the chunk size, so segments end mid-chunk
        out["segments"] = token_losses(net, windows, segment_length=12)
    # causal: the losses of the first half do not depend on the second half
    out["prefix"] = token_losses(net, windows[:, : 2 * TRAIN_LENGTH + 1])
    return out


@pytest.mark.parametrize("model", [XLSTM, TRANSFORMER], ids=["xlstm", "transformer"])
def test_position_loss_equals_a_full_forwards_per_token_loss(model):
    out = run_distributed(_losses, world_size=1, args=(model,), timeout=240)[0]
    ref = out["reference"]
    assert ref.shape == (2, 4 * TRAIN_LENGTH) and torch.isfinite(ref).all()
    torch.testing.assert_close(out["whole"], ref, rtol=1e-5, atol=1e-5)
    if "segments" in out:
        torch.testing.assert_close(out["segments"], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["prefix"], ref[:, : 2 * TRAIN_LENGTH], rtol=1e-5, atol=1e-5)

    acc = PositionLoss(ref.shape[1])
    acc.add(ref[:1])
    acc.add(ref[1:])
    rows = acc.rows()
    assert [(r["bucket_start"], r["bucket_end"]) for r in rows] == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31),
                                                                    (32, 63), (64, 64)]
    for r in rows:
        span = ref[:, r["bucket_start"] - 1 : r["bucket_end"]].double()
        assert r["tokens"] == span.numel()
        assert r["mean_loss"] == pytest.approx(span.mean().item(), rel=1e-9)
        assert r["ppl"] == pytest.approx(math.exp(r["mean_loss"]))


def test_position_buckets_cover_every_position_once():
    for length, width in [(1, 0), (100, 0), (128, 0), (100, 7), (64, 64)]:
        buckets = position_buckets(length, width)
        covered = [p for a, b in buckets for p in range(a, b + 1)]
        assert covered == list(range(1, length + 1))
    assert position_buckets(10, 4) == [(1, 4), (5, 8), (9, 10)]


# ---- the command ---------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, lengths: list[int], vocab: int, seed: int = 0) -> Path:
    """NullTokenizer text: space-separated ids (the end-of-document id, vocab - 1, left out)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for n in lengths:
            f.write(json.dumps({"text": " ".join(map(str, rng.integers(0, vocab - 1, n)))}) + "\n")
    return path


def _read_csv(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _checkpoint_losses(run_dir: str, windows: np.ndarray) -> torch.Tensor:
    """Per-token losses of the run's checkpoint (loaded by inference.loading) from plain full forwards."""
    from xlstm_megatron.inference.loading import load_model, resolve_checkpoint

    model = load_model(resolve_checkpoint(run_dir))
    return torch.cat([_reference_losses(model, torch.from_numpy(w[None])) for w in windows])


@pytest.mark.slow
def test_evaluate_cli_at_4x_the_training_length_of_a_trained_checkpoint(tmp_path: Path):
    from tests.training.engine_runs import train

    run = tmp_path / "run"  # engine_runs' tiny v1 xLSTM[3:1], seq 32, NullTokenizer of 256 ids (255: end of doc)
    train(run, "--train-iters", "2", "--lr-warmup-iters", "1", "--save-interval", "2", "--eval-interval", "2")
    length = 4 * 32
    # 3 documents long enough for a window (one exactly L + 1 tokens with its end-of-document id), 2 too short
    data = _write_jsonl(tmp_path / "docs.jsonl", [length, 40, 300, 10, 200], vocab=256)
    out = tmp_path / "eval" / "pos"
    cmd = [sys.executable, "-m", "xlstm_megatron.cli", "evaluate", "--load", str(run), "--data", str(data),
           "--eval-length", str(length), "--segment-length", "40", "--micro-batch-size", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()
    assert len(summary) == 1 and "3 windows x 128 tokens (skip)" in summary[0] and "at 33-128" in summary[0]

    rows = _read_csv(out.with_suffix(".csv"))
    assert [(r["bucket_start"], r["bucket_end"]) for r in rows] == [(a, b) for a, b in position_buckets(length)]
    assert all(r["tokens"] == 3 * (r["bucket_end"] - r["bucket_start"] + 1) for r in rows)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same windows, by an independent full forward of the checkpoint
    from xlstm_megatron.data.tokenizer import load_tokenizer
    from xlstm_megatron.inference.eval_data import eval_windows, jsonl_documents

    windows = eval_windows(jsonl_documents(data, load_tokenizer("NullTokenizer", vocab_size=256)), length)
    ref = run_distributed(_checkpoint_losses, world_size=1, args=(str(run), windows), timeout=240)[0]
    for r in rows:
        span = ref[:, int(r["bucket_start"]) - 1 : int(r["bucket_end"])]
        assert r["mean_loss"] == pytest.approx(span.double().mean().item(), rel=1e-4)
        assert r["ppl"] == pytest.approx(math.exp(r["mean_loss"]), rel=1e-6)


def _save_transformer(root: str) -> None:
    from xlstm_megatron.runs.checkpoint import save_weights_checkpoint

    args, net = _random_model(TRANSFORMER)
    save_weights_checkpoint([net], root, 1, args)


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("transformer") / "run"
    run_distributed(_save_transformer, world_size=1, args=(str(run),), timeout=240)
    return run


def test_evaluate_cli_on_the_transformer_baseline_concatenating_short_documents(transformer_run: Path,
                                                                                tmp_path: Path):
    data = _write_jsonl(tmp_path / "docs.jsonl", [20] * 20, vocab=VOCAB + 1)  # 420 tokens: 6 windows of 65
    out = tmp_path / "t"
    proc = subprocess.run([sys.executable, "-m", "xlstm_megatron.inference.evaluate_cli", "--load",
                           str(transformer_run), "--data", str(data), "--short-docs", "concat", "--bucket-width",
                           "16", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Transformer" in proc.stdout and "6 windows x 64 tokens (concat)" in proc.stdout
    rows = _read_csv(out.with_suffix(".csv"))
    assert [(r["bucket_start"], r["bucket_end"], r["tokens"]) for r in rows] == [
        (1, 16, 96), (17, 32, 96), (33, 48, 96), (49, 64, 96)]
    assert all(math.isfinite(r["mean_loss"]) for r in rows)


def _error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def _indexed(prefix: Path, docs: list[list[int]]) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def test_evaluate_bad_input_fails_in_one_line_before_any_work(transformer_run: Path, tmp_path: Path, capsys):
    data = str(_write_jsonl(tmp_path / "docs.jsonl", [100, 70], vocab=VOCAB + 1))
    run = str(transformer_run)
    assert "does not exist; pass the run's --save directory" in _error_line(
        capsys, ["--load", str(tmp_path / "none"), "--data", data])
    assert "multiple of the training length 16" in _error_line(
        capsys, ["--load", run, "--data", data, "--eval-length", "40"])
    assert "multiple of the training length 16" in _error_line(
        capsys, ["--load", run, "--data", data, "--eval-length", "8"])
    assert "no window of 129 tokens" in _error_line(capsys, ["--load", run, "--data", data, "--eval-length", "128"])
    assert "needs a recurrent xLSTM" in _error_line(capsys, ["--load", run, "--data", data, "--segment-length", "8"])
    assert "does not exist" in _error_line(capsys, ["--load", run, "--data", str(tmp_path / "missing.jsonl")])
    # data tokenized with a larger vocabulary than the checkpoint's
    prefix = _indexed(tmp_path / "big_text_document", [list(range(200, 300))])  # its one window: ids 200..264
    why = _error_line(capsys, ["--load", run, "--data", prefix, "--eval-length", "64"])
    assert "token id 264 but the checkpoint's model has 128 ids" in why
    # a tokenizer with more ids than the model has rows
    tok = tmp_path / "tok"
    from xlstm_megatron.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer([" ".join(f"w{i}" for i in range(400))], 300, tok)
    assert "exceeds the model's vocab size 128" in _error_line(
        capsys, ["--load", run, "--data", data, "--tokenizer-model", str(tok)])


def test_indexed_dataset_documents_equal_the_jsonl_documents_they_were_preprocessed_from(tmp_path: Path):
    from xlstm_megatron.data.preprocess import output_prefix_for_key, preprocess_files
    from xlstm_megatron.data.tokenizer import TokenizerSpec
    from xlstm_megatron.inference.eval_data import eval_windows, indexed_documents, jsonl_documents

    data = _write_jsonl(tmp_path / "docs.jsonl", [30, 5, 50, 17], vocab=VOCAB)
    spec = TokenizerSpec("NullTokenizer", vocab_size=VOCAB)
    preprocess_files([data], tmp_path / "d", spec, append_eod=True)
    indexed = indexed_documents(output_prefix_for_key(tmp_path / "d", "text"))
    from_text = jsonl_documents(data, spec.load())
    assert [d.tolist() for d in indexed] == [d.tolist() for d in from_text]
    assert [len(d) for d in indexed] == [31, 6, 51, 18]
    np.testing.assert_array_equal(eval_windows(indexed, 17, "skip"), np.stack([indexed[0][:18], indexed[2][:18],
                                                                          indexed[3]]))
    stream = np.concatenate(indexed)
    np.testing.assert_array_equal(eval_windows(indexed, 16, "concat", max_windows=5),
                                  stream[: 5 * 17].reshape(5, 17))

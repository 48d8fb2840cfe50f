"""Runs of `xlstm-megatron train` (Megatron's `pretrain()`) as a user starts them, for the engine tests: a subprocess
per run, `--nproc N` real gloo ranks, mock data; results read back from the run's TensorBoard events (Megatron's own
logging) and its Megatron checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

# A tiny v1 xLSTM[3:1] (mLSTM and sLSTM blocks). The vocab pads to 256 at TP 1 and 2 alike (same model).
BASE = [
    "--xlstm-block", "v1", "--xlstm-pattern", "msmm", "--num-layers", "4", "--hidden-size", "32",
    "--num-attention-heads", "2", "--slstm-num-heads", "2", "--mlstm-chunk-size", "8",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--adam-eps", "1e-5",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
    "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1", "--save-interval", "3",
]


def short_documents(prefix: Path, count: int = 400, seed: int = 0) -> Path:
    """A Megatron indexed dataset (`prefix`.bin/.idx) of `count` documents of 2-20 tokens, each ending in the
    NullTokenizer's end-of-document id (255 at --vocab-size 256): every 32-token sample packs several documents."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for length in rng.integers(1, 20, size=count):
        doc = np.append(rng.integers(0, 255, size=length), 255)
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return prefix


def train(save: Path, *flags: str, nproc: int = 1, timeout: int = 300, data: Path | None = None) -> dict:
    """Run the command; return the losses Megatron logged: {"train": {it: loss}, "valid": {it: loss}}. `data`: an
    indexed dataset prefix instead of the mock data."""
    base = BASE if data is None else [a for a in BASE if a != "--mock-data"] + ["--data-path", str(data)]
    cmd = [sys.executable, "-m", "xlstm_megatron.cli", "train", *base, "--save", str(save), "--nproc", str(nproc),
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    summary = json.loads((save / "summary.json").read_text())
    return {name: {int(it): loss for it, loss in points} for name, points in summary["history"].items()}


def model_tensors(iter_dir: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a Megatron dist checkpoint (optimizer state left out: its buckets carry padding)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = iter_dir.parent / f"{iter_dir.name}.pt"
    dcp_to_torch_save(str(iter_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith("optimizer.")}


def close(a: dict[int, float], b: dict[int, float], rtol: float = 2e-5) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rtol * abs(b[k]) for k in a)

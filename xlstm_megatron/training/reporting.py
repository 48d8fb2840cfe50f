"""What a training run shows: Megatron-style iteration lines, a progress bar, TensorBoard scalars, a loss-curve PNG."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any


class Reporter:
    """Lives on every rank (each keeps the same history: values are reduced to all ranks, and checkpoints need
    identical common state everywhere) but prints and writes files only on global rank 0."""

    def __init__(self, total_iters: int, tensorboard_dir: str | None, progress_bar: bool, active: bool) -> None:
        self.total, self.active = total_iters, active
        self.bar = progress_bar and active and sys.stderr.isatty()
        self.writer = None
        if active and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        self.history: dict[str, list[list[float]]] = {"train": [], "valid": []}
        self._t0 = time.time()

    def iteration(self, it: int, values: dict[str, float], show: bool) -> None:
        self.history["train"].append([it, values["lm loss"]])
        if not self.active:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k.replace(" ", "_"), v, it)
        if show:
            self._clear_bar()
            fields = [f"iteration {it:8d}/{self.total:8d}"] + [_fmt(k, v) for k, v in values.items()]
            print(" | ".join(fields), flush=True)
        if self.bar:
            done = int(30 * it / self.total)
            eta = (time.time() - self._t0) / max(it, 1) * (self.total - it)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {it}/{self.total} "
                             f"loss {values['lm loss']:.3f} eta {eta:5.0f}s")
            sys.stderr.flush()

    def validation(self, it: int, loss: float) -> None:
        self.history["valid"].append([it, loss])
        if not self.active:
            return
        ppl = math.exp(min(loss, 50.0))
        if self.writer is not None:
            self.writer.add_scalar("valid/lm_loss", loss, it)
            self.writer.add_scalar("valid/ppl", ppl, it)
        self._clear_bar()
        print(f" validation at iteration {it} | lm loss: {loss:.4f} | lm loss PPL: {ppl:.2f}", flush=True)

    def message(self, text: str) -> None:
        if self.active:
            self._clear_bar()
            print(text, flush=True)

    def _clear_bar(self) -> None:
        if self.bar:
            sys.stderr.write("\r" + " " * 80 + "\r")

    def close(self) -> None:
        self._clear_bar()
        if self.writer is not None:
            self.writer.close()


# Dense peak TFLOP/s per device (bf16 tensor cores / fp32 without TF32), for the MFU column on GPUs.
PEAK_TFLOPS = {"H100": (989.0, 67.0), "H200": (989.0, 67.0), "A100": (312.0, 19.5), "B200": (2250.0, 80.0)}


def peak_tflops_per_device(bf16: bool) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (half, single) in PEAK_TFLOPS.items():
        if key in name:
            return half if bf16 else single
    return None


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key in ("learning rate", "lm loss", "grad norm"):
            return f"{key}: {value:.6E}"
        return f"{key}: {value:.4g}" if key in ("MFU", "TFLOP/s/device") else f"{key}: {value:.1f}"
    return f"{key}: {value}"


def plot_loss_curve(history: dict[str, list[list[float]]], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("train", "-"), ("valid", "o-")):
        points = history.get(name) or []
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style, label=f"{name} loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

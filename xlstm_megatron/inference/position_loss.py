"""Per-token-position loss of a language model on sequences longer than it was trained on (length extrapolation).

`token_losses(model, tokens)` is the cross-entropy of every next-token prediction of a (B, L + 1) token window, as
Megatron's own loss computes it (`GPTModel.forward(..., labels=...)`, vocab-parallel under TP). With
`segment_length` an xLSTM runs the window in segments that carry the recurrent state
(`RecurrentInferenceContext`), so activations stay bounded by the segment however long the window; without it one
forward covers the window (the mLSTM is chunkwise: memory is linear in L either way, no L x L tensor). A Transformer
runs one full forward (its attention is L x L by design).

`PositionLoss` sums the losses per position over windows; `rows` averages them over position buckets (log2 or
fixed-width) into CSV rows `bucket_start, bucket_end, mean_loss, ppl, tokens` (1-based positions, end inclusive).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

CSV_FIELDS = ("bucket_start", "bucket_end", "mean_loss", "ppl", "tokens")


def position_buckets(length: int, width: int = 0) -> list[tuple[int, int]]:
    """Inclusive 1-based position ranges covering 1..length: doubling ([1,1], [2,3], [4,7], ...) for width 0
    (log-x plots get evenly spaced points), else `width` positions each."""
    if length < 1 or width < 0:
        raise ValueError(f"need length >= 1 and width >= 0, got {length} and {width}")
    buckets, start = [], 1
    while start <= length:
        end = min(length, 2 * start - 1 if width == 0 else start + width - 1)
        buckets.append((start, end))
        start = end + 1
    return buckets


def _model_config(model: torch.nn.Module):
    while not hasattr(model, "decoder") and hasattr(model, "module"):  # Float16Module / DDP wrappers
        model = model.module
    return model.config


def is_recurrent(model: torch.nn.Module) -> bool:
    """Whether every layer keeps a recurrent state (an xLSTM without attention layers), so segments can carry it."""
    return "*" not in getattr(_model_config(model), "layer_pattern", "*")


@torch.no_grad()
def token_losses(model: torch.nn.Module, tokens: Tensor, segment_length: int | None = None) -> Tensor:
    """(B, L) fp32 loss of predicting tokens[:, t + 1] from tokens[:, : t + 1], for a (B, L + 1) window.

    `segment_length`: run the window in segments of this many tokens carrying the recurrent state (xLSTM only);
    None: one forward over the whole window.
    """
    from xlstm_megatron.layers.recurrent_context import RecurrentInferenceContext

    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"need a (B, L + 1) window with L >= 1, got shape {tuple(tokens.shape)}")
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if segment_length is None or segment_length >= inputs.shape[1]:
        return model(inputs, None, None, labels=labels).float()
    if segment_length < 1 or not is_recurrent(model):
        raise ValueError("segmented evaluation needs segment_length >= 1 and a recurrent model (no attention layers)")
    context, parts = RecurrentInferenceContext(), []
    for start in range(0, inputs.shape[1], segment_length):
        end = start + segment_length
        parts.append(model(inputs[:, start:end], None, None, labels=labels[:, start:end],
                           inference_context=context).float())
        context.increment_sequence_len_offset(parts[-1].shape[1])
    return torch.cat(parts, dim=1)


@dataclass
class PositionLoss:
    """Running per-position sums of token losses over windows of `length` predictions."""

    length: int

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros(self.length, dtype=torch.float64)
        self.count = torch.zeros(self.length, dtype=torch.long)

    def add(self, losses: Tensor) -> None:
        """Add a (B, length) batch of per-token losses."""
        if losses.dim() != 2 or losses.shape[1] != self.length:
            raise ValueError(f"expected (B, {self.length}) losses, got {tuple(losses.shape)}")
        self.loss_sum += losses.detach().double().sum(0).cpu()
        self.count += losses.shape[0]

    def mean(self, start: int = 1, end: int | None = None) -> float:
        """Mean loss over 1-based positions start..end (inclusive; default: to the end)."""
        s = slice(start - 1, end)
        return float(self.loss_sum[s].sum() / self.count[s].sum())

    def rows(self, width: int = 0) -> list[dict[str, float | int]]:
        """One CSV row per position bucket (see `position_buckets`)."""
        out = []
        for start, end in position_buckets(self.length, width):
            loss = self.mean(start, end)
            out.append(dict(bucket_start=start, bucket_end=end, mean_loss=loss, ppl=_ppl(loss),
                            tokens=int(self.count[start - 1 : end].sum())))
        return out


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def write_csv(rows: list[dict[str, float | int]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_position_loss(rows: list[dict[str, float | int]], path: str | Path, title: str,
                       train_length: int | None = None) -> Path:
    """Loss and perplexity against token position (bucket centre, log-x), the training length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [math.sqrt(r["bucket_start"] * r["bucket_end"]) for r in rows]  # geometric centre: log-x midpoint
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_loss, "mean_loss", "cross-entropy (nats/token)"), (ax_ppl, "ppl", "perplexity")):
        ax.plot(xs, [r[key] for r in rows], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("token position")
        ax.set_ylabel(label)
        if train_length:
            ax.axvline(train_length, color="gray", linestyle="--", label=f"training length {train_length}")
            ax.legend()
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

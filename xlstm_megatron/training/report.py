"""What a run leaves besides Megatron's own checkpoints and logs, made after `pretrain()` returns (rank 0): the loss
curve (PNG) from Megatron's TensorBoard events, a text sample from the last checkpoint, the unigram baseline a
language model must beat, and `summary.json`.
"""

from __future__ import annotations

import json
import math
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRAIN_TAG, VALID_TAG = "lm loss", "lm loss validation"  # Megatron's TensorBoard scalar names


def loss_history(tensorboard_dir: str | Path) -> dict[str, list[list[float]]]:
    """(iteration, loss) points of the training and validation loss; a resumed run's later values win."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    history: dict[str, list[list[float]]] = {}
    for name, tag in (("train", TRAIN_TAG), ("valid", VALID_TAG)):
        points = {s.step: s.value for s in events.Scalars(tag)} if tag in tags else {}
        history[name] = [[step, points[step]] for step in sorted(points)]
    return history


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


def _unigram_baseline(args: Namespace) -> float | None:
    """Validation cross-entropy of the smoothed unigram distribution of the training samples (same datasets,
    seed and sample counts as the run)."""
    import numpy as np
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from xlstm_megatron.data.datasets import build_gpt_datasets

    if args.mock_data or not args.data_path or not args.eval_iters:
        return None
    tokenizer = build_tokenizer(args)
    vocab = int(args.padded_vocab_size)
    train_n, valid_n = args.train_iters * args.global_batch_size, args.eval_iters * args.global_batch_size
    train, valid, _ = build_gpt_datasets(
        tokenizer, seq_length=args.seq_length, data_path=args.data_path, split=args.split,
        num_samples=(train_n, valid_n, 0), seed=args.seed, cache_dir=args.data_cache_path,
    )
    if train is None or valid is None:
        return None

    def counts(dataset: Any, n: int) -> np.ndarray:
        total = np.zeros(vocab, dtype=np.int64)
        for i in range(n):
            sample = dataset[i % len(dataset)]
            labels = np.asarray(sample["labels"])[np.asarray(sample["loss_mask"]) > 0]
            total += np.bincount(labels, minlength=vocab)[:vocab]
        return total

    train_counts = counts(train, train_n)
    probs = (train_counts + 1) / (train_counts.sum() + vocab)
    valid_counts = counts(valid, valid_n)
    return float(-(valid_counts * np.log(probs)).sum() / max(valid_counts.sum(), 1))


def write_report(args: Namespace, sample_text: Callable[[str, str, int, int], str] | None = None
                 ) -> dict[str, Any] | None:
    """After `pretrain()`: loss curve, baseline, a text sample (`sample_text(checkpoint dir, prompt, tokens, seed)`,
    given by the caller: generation is the inference tier's) and `<save>/summary.json`; prints the headline figures."""
    from xlstm_megatron.runs.args import architecture_line
    from xlstm_megatron.runs.checkpoint import latest_iteration

    if not args.save:
        return None
    save = Path(args.save)
    summary: dict[str, Any] = {"architecture": architecture_line(args), "iteration": latest_iteration(save)}
    if args.tensorboard_dir and Path(args.tensorboard_dir).is_dir():
        history = loss_history(args.tensorboard_dir)
        summary["history"] = history
        if history["train"]:
            png = plot_loss_curve(history, args.loss_curve or save / "loss_curve.png", summary["architecture"])
            summary["loss_curve"] = str(png)
            print(f"loss curve: {png}")
        if history["valid"]:
            summary["valid_loss"] = history["valid"][-1][1]
            summary["valid_ppl"] = math.exp(min(summary["valid_loss"], 50.0))
    baseline = _unigram_baseline(args)
    if baseline is not None:
        summary.update(unigram_valid_loss=baseline, unigram_valid_ppl=math.exp(min(baseline, 50.0)))
        if "valid_ppl" in summary:
            print(f"validation PPL {summary['valid_ppl']:.1f} vs unigram baseline PPL "
                  f"{summary['unigram_valid_ppl']:.1f}")
    if sample_text is not None and args.sample_tokens and summary["iteration"] is not None:
        summary["sample"] = sample_text(str(save), args.sample_prompt, args.sample_tokens, args.seed)
        print(f"----- sample ({args.sample_tokens} tokens) -----\n{summary['sample']}\n-----")
    (save / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

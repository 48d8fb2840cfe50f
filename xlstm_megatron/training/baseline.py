"""The unigram baseline a language model must beat: token frequencies of the training samples the run used,
scored on the run's validation samples (add-one smoothing)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _label_counts(dataset: Any, num_samples: int, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(num_samples):
        sample = dataset[i % len(dataset)]
        labels = np.asarray(sample["labels"])[np.asarray(sample["loss_mask"]) > 0]
        counts += np.bincount(labels, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_baseline_loss(train: Any, valid: Any, train_samples: int, valid_samples: int, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the smoothed training unigram distribution on the validation samples."""
    train_counts = _label_counts(train, train_samples, vocab_size)
    probs = (train_counts + 1) / (train_counts.sum() + vocab_size)
    valid_counts = _label_counts(valid, valid_samples, vocab_size)
    return float(-(valid_counts * np.log(probs)).sum() / max(valid_counts.sum(), 1))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))

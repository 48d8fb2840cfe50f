"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p (nucleus) filters."""

from __future__ import annotations

import torch
from torch import Tensor


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")


def next_tokens(
    logits: Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """logits (B, V) -> token ids (B,).

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, restricted to the `top_k`
    largest (0: all) and then to the smallest set of most likely tokens whose probability reaches `top_p` (1: all;
    the most likely token always stays), and one token is drawn with `generator`. top_k = 1 therefore equals greedy.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

"""The official xLSTM initialisations as plain functions (usable on full tensors and as Megatron ``init_method``)."""

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def small_init_std(dim: int) -> float:
    """Std of "small init" (Nguyen & Salazar 2019): ``sqrt(2 / (5 dim))``, ``dim`` = model embedding dim."""
    return math.sqrt(2 / (5 * dim))


def wang_init_std(dim: int, num_blocks: int) -> float:
    """Std of Wang init for output projections: ``2 / (num_blocks * sqrt(dim))``."""
    return 2 / num_blocks / math.sqrt(dim)  # same operation order as the official code, so the float is identical


def normal_init_method(std: float) -> Callable[[Tensor], None]:
    """Megatron ``init_method``: a callable that fills a tensor in place with ``N(0, std^2)``."""

    def init_(tensor: Tensor) -> None:
        torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def mlstm_forget_gate_bias(num_heads: int) -> Tensor:
    """mLSTM forget-gate bias, one per head: ``linspace(3, 6, num_heads)`` (fp32, used by v1 and xLSTM-Large)."""
    return torch.linspace(3.0, 6.0, num_heads, dtype=torch.float32)


def slstm_forget_gate_bias(head_dim: int, block_idx: int, num_blocks: int) -> Tensor:
    """sLSTM "powerlaw_blockdependent" forget-gate bias over the head dim, from +5 (j=0) down to -7 (j=DH-1).

    ``b_j = -(-5 + 12 * (j / (DH - 1)) ** (0.3 + 1.3 * r))`` with ``r = block_idx / (num_blocks - 1)``, and ``r = 0``
    when ``num_blocks == 1`` (as the official cell). Returns fp32 ``(head_dim,)``; the same for every head.
    ``head_dim == 1`` gives ``[5.]`` (the official formula would give NaN from 0/0).
    """
    if head_dim < 1 or num_blocks < 1 or not 0 <= block_idx < num_blocks:
        raise ValueError(f"need head_dim >= 1, 0 <= block_idx < num_blocks: {head_dim=}, {block_idx=}, {num_blocks=}")
    ratio = block_idx / (num_blocks - 1) if num_blocks > 1 else 0.0
    pos = torch.arange(head_dim, dtype=torch.float32) / max(head_dim - 1, 1)
    return -(-5.0 + 12.0 * pos ** (0.3 + 1.3 * ratio))


@contextlib.contextmanager
def gathered_for_write(*params: Tensor) -> Iterator[None]:
    """Write into parameters in place even when DeepSpeed ZeRO-3 has already partitioned them (a model built under
    `deepspeed.zero.Init`: a child module's weight is partitioned before its parent initialises it): gathered for the
    block, rank 0's values (every rank draws the same) re-partitioned after it. A plain no-op otherwise; DeepSpeed is
    imported only when such a parameter is given."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield

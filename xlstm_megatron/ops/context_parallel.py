"""Sequence layout and the small collectives of context parallelism (CP) for recurrent layers.

Under CP every rank of the CP group holds pieces of each sequence. Megatron's attention CP splits a sequence into
2 * CP equal pieces and gives rank r pieces (r, 2 * CP - 1 - r) ("zigzag", balanced for causal attention); the
recurrent layers follow the same layout so hybrids with attention layers see one sequence order. A rank's local
sequence is its pieces concatenated in that order.

A recurrent layer under CP needs from other ranks only a fixed-size summary per piece (the mLSTM's state, the
conv's last K - 1 inputs), never the sequence: `all_gather_pieces` hands every rank every piece's summary and the
backward sums the summaries' gradients back to their owners.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

Layout = Literal["zigzag", "contiguous"]
LAYOUTS = ("zigzag", "contiguous")


def cp_pieces(layout: Layout, rank: int, size: int) -> tuple[int, ...]:
    """Global indices, in local order, of the sequence pieces CP rank `rank` of `size` holds.

    "zigzag": 2 * size pieces, rank r holds (r, 2 * size - 1 - r) (Megatron's `get_batch_on_this_cp_rank`);
    "contiguous": `size` pieces, rank r holds piece r.
    """
    if layout == "zigzag":
        return (rank, 2 * size - 1 - rank)
    if layout == "contiguous":
        return (rank,)
    raise ValueError(f"CP layout {layout!r} is unknown; use one of {LAYOUTS}")


def cp_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def split_pieces(x: Tensor, dim: int, pieces: int) -> Tensor:
    """(..., S, ...) with S along `dim` -> (pieces * B, ..., S / pieces, ...): the local pieces stacked on dim 0
    (piece-major), so one batched call runs them all. `x.shape[0]` is the batch B."""
    if x.shape[dim] % pieces:
        raise ValueError(f"a local sequence of {x.shape[dim]} tokens does not split into {pieces} equal CP pieces")
    x = x.unflatten(dim, (pieces, x.shape[dim] // pieces)).movedim(dim, 0)
    return x.flatten(0, 1)


def join_pieces(x: Tensor, dim: int, pieces: int) -> Tensor:
    """Inverse of `split_pieces`."""
    x = x.unflatten(0, (pieces, x.shape[0] // pieces)).movedim(0, dim)
    return x.flatten(dim, dim + 1)


class _AllGather(torch.autograd.Function):
    """Stacked all-gather with a summing backward. The backward all-reduces the whole gradient and keeps this rank's
    slice (all-reduce runs on every backend, gloo included; the summaries are small)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        rank, size = cp_rank_and_size(group)
        ctx.rank = rank
        if size == 1:
            return x.unsqueeze(0).clone()
        parts = [torch.empty_like(x) for _ in range(size)]  # a list: gloo has no all_gather_into_tensor
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        if grad.shape[0] > 1:
            dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def all_gather_pieces(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """x (local pieces, ...) -> (CP size, local pieces, ...): every rank's `x`, differentiably. Tie the result into
    the output with `depends_on`: its backward is a collective every rank must enter."""
    return _AllGather.apply(x, group)


class _DependsOn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: Tensor, gathered: Tensor) -> Tensor:
        ctx.gathered_meta = (gathered.shape, gathered.dtype, gathered.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        shape, dtype, device = ctx.gathered_meta
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def depends_on(output: Tensor, gathered: Tensor) -> Tensor:
    """`output`, with `gathered` (an `all_gather_pieces` result) on its backward path even where this rank's output
    does not use it (the first pieces need nothing from other ranks): the all-gather's backward is a collective, and
    the other ranks' gradients for this rank's summaries arrive only through it."""
    return _DependsOn.apply(output, gathered) if gathered.requires_grad else output


def previous_piece_tails(
    x: Tensor, tail: int, *, group: dist.ProcessGroup | None, layout: Layout, doc_starts: Tensor | None = None
) -> Tensor:
    """The `tail` inputs preceding each local piece in the global sequence: the halo of a causal conv.

    x: (pieces * B, L, C) pieces as `split_pieces(..., dim=1, ...)` gives them; doc_starts: (pieces * B, L) or None.
    Returns (pieces * B, tail, C): the last `tail` rows of the previous global piece (zeros before piece 0), with
    rows before that piece's last document start zeroed (they belong to an earlier document).
    """
    rank, size = cp_rank_and_size(group)
    mine = cp_pieces(layout, rank, size)
    n = len(mine)
    if x.shape[1] < tail:
        raise ValueError(f"CP pieces of {x.shape[1]} tokens are shorter than the conv's {tail}-token window; "
                         "use a longer sequence or a smaller context-parallel size")
    ends = x[:, x.shape[1] - tail:]
    if doc_starts is not None:
        pos = torch.arange(x.shape[1], device=x.device)
        last_start = torch.where(doc_starts, pos, -1).amax(-1)  # (pieces * B,)
        ends = torch.where((pos[x.shape[1] - tail:] >= last_start[:, None])[..., None], ends, 0.0)
    gathered = all_gather_pieces(ends.unflatten(0, (n, -1)), group)  # (size, n, B, tail, C)
    owner = {g: (r, s) for r in range(size) for s, g in enumerate(cp_pieces(layout, r, size))}
    halos = [torch.zeros_like(ends[: ends.shape[0] // n]) if g == 0 else gathered[owner[g - 1]] for g in mine]
    return depends_on(torch.cat(halos, dim=0), gathered)


__all__ = ["LAYOUTS", "Layout", "all_gather_pieces", "cp_pieces", "cp_rank_and_size", "depends_on", "join_pieces",
           "previous_piece_tails", "split_pieces"]

"""Context parallelism of the recurrent ops: the mLSTM by state passing and the causal conv by halo equal one pass over
the whole sequence (values and every gradient), in Megatron's zigzag layout and the contiguous one, with packed
documents (starts on piece boundaries, one-token documents), on one rank holding several pieces and on real gloo
ranks."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import run_distributed
from xlstm_megatron.ops.context_parallel import cp_pieces, previous_piece_tails, split_pieces
from xlstm_megatron.ops.conv import causal_conv1d
from xlstm_megatron.ops.mlstm.chunkwise import mlstm_chunkwise
from xlstm_megatron.ops.mlstm.context_parallel import mlstm_context_parallel

B, NH, S, DQK, DV, C, K = 2, 2, 24, 4, 6, 5, 4


def _inputs(seed: int, dtype: torch.dtype = torch.float64, starts: torch.Tensor | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, NH, S, DQK, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, NH, S, DV, generator=g, dtype=dtype)
    i = torch.randn(B, NH, S, generator=g, dtype=dtype) * 3
    if starts is not None:  # closed input gates at the starts: the fresh state's m = 0 then sets the stabiliser
        i = torch.where(starts[:, None], -6.0, i)
    f = torch.randn(B, NH, S, generator=g, dtype=dtype) * 3 + 2
    return [t.requires_grad_() for t in (q, k, v, i, f)]


def _doc_starts(pieces: int) -> torch.Tensor:
    """Row 0: one-token documents, a start on a piece boundary; row 1: one-token documents ending pieces."""
    starts = torch.zeros(B, S, dtype=torch.bool)
    L = S // pieces
    starts[0, [0, 3, 4, L, 2 * L - 1]] = True
    starts[1, [L - 1, 2 * L - 1, S - 1]] = True
    return starts


def _local(x: torch.Tensor, dim: int, pieces: tuple[int, ...], total: int) -> torch.Tensor:
    """This rank's pieces of a full-sequence tensor, concatenated in local order."""
    parts = x.chunk(total, dim=dim)
    return torch.cat([parts[g] for g in pieces], dim=dim)


def _mlstm_case(rank: int, size: int, layout: str, backward: str, packed: bool) -> list[torch.Tensor]:
    """Returns [output error, gradient sums...]: the CP output of this rank's pieces against the one-pass reference,
    and this rank's gradients of the full inputs (to be summed over ranks)."""
    pieces = cp_pieces(layout, rank, size)
    total = 2 * size if layout == "zigzag" else size
    starts = _doc_starts(total) if packed else None
    xs = _inputs(7, starts=starts)
    ref = mlstm_chunkwise(*xs, chunk_size=4, backward=backward, doc_starts=starts)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.dtype)
    ref_grads = torch.autograd.grad((ref * weight).sum(), xs)
    local = [_local(x, 2, pieces, total) for x in xs]
    out = mlstm_context_parallel(
        *local, group=torch.distributed.group.WORLD if size > 1 else None, layout=layout,
        doc_starts=None if starts is None else _local(starts, 1, pieces, total), backward=backward, chunk_size=4,
    )
    grads = torch.autograd.grad((out * _local(weight, 2, pieces, total)).sum(), xs)
    err = (out - _local(ref, 2, pieces, total)).abs().max()
    return [err, *grads, *ref_grads]


def _check(results: list[list[torch.Tensor]]) -> None:
    n = (len(results[0]) - 1) // 2
    for r in results:
        assert r[0] < 1e-12
    for j in range(n):
        summed = sum(r[1 + j] for r in results)
        torch.testing.assert_close(summed, results[0][1 + n + j], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward", ["exact", "constant"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_mlstm_two_pieces_on_one_rank_equal_one_pass(backward, packed):
    _check([_mlstm_case(0, 1, "zigzag", backward, packed)])


def _ranks_mlstm() -> list[list[torch.Tensor]]:
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return [_mlstm_case(rank, size, layout, backward, packed)
            for layout in ("zigzag", "contiguous") for backward in ("exact", "constant") for packed in (False, True)]


def test_mlstm_state_passing_over_gloo_ranks_equals_one_pass():
    per_rank = run_distributed(_ranks_mlstm, world_size=2, init_model_parallel=False)
    for case in range(len(per_rank[0])):
        _check([r[case] for r in per_rank])


def test_mlstm_context_parallel_keeps_low_precision_inputs_close():
    """fp32 and bf16 inputs: the state passing adds no error beyond the cell's own (fp32 state math)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        xs = [x.detach().to(dtype) for x in _inputs(11)]
        ref = mlstm_chunkwise(*xs, chunk_size=4)
        out = mlstm_context_parallel(*xs, group=None, layout="zigzag", chunk_size=4)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def _conv_case(rank: int, size: int, layout: str, packed: bool) -> list[torch.Tensor]:
    pieces = cp_pieces(layout, rank, size)
    total = 2 * size if layout == "zigzag" else size
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, S, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, K, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    starts = _doc_starts(total) if packed else None
    ref = causal_conv1d(x, w, b, doc_starts=starts)
    weight = torch.randn(ref.shape, generator=g, dtype=ref.dtype)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (x, w, b))
    n = len(pieces)
    xs = split_pieces(_local(x, 1, pieces, total), 1, n)
    ds = None if starts is None else split_pieces(_local(starts, 1, pieces, total), 1, n)
    group = torch.distributed.group.WORLD if size > 1 else None
    halo = previous_piece_tails(xs, K - 1, group=group, layout=layout, doc_starts=ds)
    out = causal_conv1d(xs, w, b, state=halo, doc_starts=ds)
    local_ref = split_pieces(_local(ref, 1, pieces, total), 1, n)
    grads = torch.autograd.grad((out * split_pieces(_local(weight, 1, pieces, total), 1, n)).sum(), (x, w, b))
    return [(out - local_ref).abs().max(), *grads, *ref_grads]


def _ranks_conv() -> list[list[torch.Tensor]]:
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return [_conv_case(rank, size, layout, packed) for layout in ("zigzag", "contiguous") for packed in (False, True)]


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_conv_halo_on_one_rank_equals_one_pass(packed):
    _check([_conv_case(0, 1, "zigzag", packed)])


def test_conv_halo_over_gloo_ranks_equals_one_pass():
    per_rank = run_distributed(_ranks_conv, world_size=2, init_model_parallel=False)
    for case in range(len(per_rank[0])):
        _check([r[case] for r in per_rank])


def test_pieces_shorter_than_the_conv_window_are_refused():
    x = torch.zeros(2 * B, K - 2, C)
    with pytest.raises(ValueError, match="shorter than the conv's 3-token window"):
        previous_piece_tails(x, K - 1, group=None, layout="zigzag")

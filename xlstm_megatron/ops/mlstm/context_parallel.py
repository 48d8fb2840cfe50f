"""Context-parallel mLSTM by state passing: each CP rank runs its sequence pieces from the exact incoming state.

The mLSTM memory is linear in its past: with the true (unstabilised) state, the state after a piece is
exp(F) * state_before + S_piece, where F is the piece's summed log forget gate and S_piece the state the piece builds
from nothing. So every rank
  1. summarises each of its pieces: (C, n) from nothing, the stabiliser m* of those sources, F, and whether a
     document starts inside the piece (the incoming state is then replaced by the empty one, m = 0, at the last
     start, and C, n, m*, F cover the last document only). O(L * DQK * DV) per head, no outputs;
  2. all-gathers the summaries (B * NH * (DQK * DV + DQK + 3) numbers per piece, independent of the length);
  3. folds the summaries of all earlier pieces in global order into the state entering each of its pieces, with the
     recurrent stabiliser: m_out = max(F + m_in, m*) (the recurrence from m_0 = 0 gives the same m at every boundary);
  4. runs the chunkwise cell on its pieces from those states (one batched call).
Backward is autograd through the same steps: the cell's initial-state gradients flow into the fold and, through the
all-gather's summing backward, into the earlier pieces' k, v, i, f on their own ranks.

With `backward="constant"` the stabilisers of steps 1 and 3 are held constant like the cell's own (the cell gives no
gradient to its m_0); with "exact" everything is differentiated, so both semantics equal the single-sequence cell.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from xlstm_megatron.ops.context_parallel import (
    Layout,
    all_gather_pieces,
    cp_pieces,
    cp_rank_and_size,
    depends_on,
    join_pieces,
    split_pieces,
)
from xlstm_megatron.ops.mlstm.chunkwise import mlstm_chunkwise
from xlstm_megatron.ops.mlstm.common import MLSTMState, check_doc_starts, check_shapes, compute_dtype


def mlstm_state_summary(
    k: Tensor, v: Tensor, i: Tensor, f: Tensor, *, doc_starts: Tensor | None = None, constant: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What a sequence adds to the mLSTM memory: (C, n, m*, F, reset).

    k (B, NH, L, DQK), v (B, NH, L, DV), i, f (B, NH, L). C (B, NH, DQK, DV) and n (B, NH, DQK) are built from the
    sources of the last document, stored divided by exp(m*), m* = max_j (i_j + sum_{l > j} log sigmoid(f_l)) over
    them; F (B, NH) is the summed log forget gate of that document's part; reset (B, NH) is 1 where `doc_starts`
    (B, L) marks a start: the state entering the sequence is replaced there by the empty state (m = 0) first.
    `constant`: m* is returned without gradient (the "constant" backward semantics). Computed in fp32 (fp64 for fp64).
    """
    dt = compute_dtype(k, v, i, f)
    log_f = F.logsigmoid(f.to(dt))
    if doc_starts is not None:
        pos = torch.arange(k.shape[2], device=k.device)
        last_start = torch.where(doc_starts, pos, -1).amax(-1)  # (B,), -1: no start
        source = (pos >= last_start[:, None])[:, None]  # (B, 1, L): the last document's tokens
        log_f = torch.where(source, log_f, 0.0)
    through = log_f.flip(-1).cumsum(-1).flip(-1)  # sum_{l >= j}: a reversed cumsum, no cancellation
    after = torch.cat([through[..., 1:], torch.zeros_like(through[..., :1])], dim=-1)  # sum_{l > j}
    weight_log = i.to(dt) + after
    reset = torch.zeros_like(through[..., 0])
    if doc_starts is not None:
        weight_log = torch.where(source, weight_log, float("-inf"))
        reset = reset + (last_start >= 0).to(dt)[:, None]
    m_star = weight_log.amax(-1)
    if constant:
        m_star = m_star.detach()
    w = torch.exp(weight_log - m_star[..., None])
    kw = k.to(dt) * w[..., None]
    return kw.transpose(-2, -1) @ v.to(dt), kw.sum(-2), m_star, through[..., 0], reset


def fold_state(
    state: MLSTMState, summary: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], *, constant: bool = False
) -> MLSTMState:
    """The state after a piece with `summary` (from `mlstm_state_summary`), entered with `state` (C, n, m)."""
    C, n, m = state
    C_p, n_p, m_p, total, reset = summary
    kept = reset == 0
    # a document start inside the piece: its last document began from the empty state (C = n = 0, m = 0)
    C, n, m = torch.where(kept[..., None, None], C, 0.0), torch.where(kept[..., None], n, 0.0), \
        torch.where(kept, m, 0.0)
    carried = total + m
    m_out = torch.maximum(carried, m_p)
    if constant:  # the stabilisers are constants: only F carries a gate gradient here
        m_out = m_out.detach()
    a, b = torch.exp(carried - m_out), torch.exp(m_p - m_out)
    return a[..., None, None] * C + b[..., None, None] * C_p, a[..., None] * n + b[..., None] * n_p, m_out


Cell = Callable[..., tuple[Tensor, MLSTMState]]


def mlstm_context_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    group: dist.ProcessGroup | None,
    layout: Layout = "zigzag",
    doc_starts: Tensor | None = None,
    backward: Literal["exact", "constant"] = "exact",
    cell: Cell | None = None,
    **cell_kwargs,
) -> Tensor:
    """The mLSTM of the whole sequence, computed where this CP rank holds its pieces (see the module docstring).

    q, k (B, NH, S_local, DQK), v (B, NH, S_local, DV), i, f (B, NH, S_local): this rank's pieces of the sequence
    (`layout`, see `ops.context_parallel.cp_pieces`) concatenated; doc_starts (B, S_local) likewise. Returns this
    rank's h (B, NH, S_local, DV). `cell` (default `mlstm_chunkwise`) takes the chunkwise signature with
    `initial_state`, `return_final_state`, `backward` and `doc_starts`; `cell_kwargs` go to it (chunk_size, eps).
    Every rank of `group` must call this with equal shapes.
    """
    check_shapes(q, k, v, i, f)
    check_doc_starts(doc_starts, (q.shape[0], q.shape[2]))
    cell = mlstm_chunkwise if cell is None else cell
    constant = backward == "constant"
    rank, size = cp_rank_and_size(group)
    mine = cp_pieces(layout, rank, size)
    n = len(mine)
    B, NH, DQK, DV = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    qs, ks, vs = (split_pieces(t, 2, n) for t in (q, k, v))
    i_s, f_s = split_pieces(i, 2, n), split_pieces(f, 2, n)
    starts = None if doc_starts is None else split_pieces(doc_starts, 1, n)

    C_p, n_p, m_p, total, reset = mlstm_state_summary(ks, vs, i_s, f_s, doc_starts=starts, constant=constant)
    packed = torch.cat([C_p.flatten(-2), n_p, torch.stack([m_p, total, reset], dim=-1)], dim=-1)  # (n * B, NH, X)
    gathered = all_gather_pieces(packed.unflatten(0, (n, B)), group)  # (size, n, B, NH, X)
    owner = {g: (r, s) for r in range(size) for s, g in enumerate(cp_pieces(layout, r, size))}

    dt = packed.dtype
    state: MLSTMState = (q.new_zeros((B, NH, DQK, DV), dtype=dt), q.new_zeros((B, NH, DQK), dtype=dt),
                         q.new_zeros((B, NH), dtype=dt))
    entering: dict[int, MLSTMState] = {}
    for g in range(max(mine) + 1):
        entering[g] = state
        if g == max(mine):
            break
        piece = gathered[owner[g]]
        C_g, rest = piece[..., : DQK * DV].unflatten(-1, (DQK, DV)), piece[..., DQK * DV:]
        state = fold_state(state, (C_g, rest[..., :DQK], *rest[..., DQK:].unbind(-1)), constant=constant)
    initial = tuple(torch.cat([entering[g][j] for g in mine], dim=0) for j in range(3))

    h, _ = cell(qs, ks, vs, i_s, f_s, initial_state=initial, return_final_state=True, backward=backward,
                doc_starts=starts, **cell_kwargs)
    return join_pieces(depends_on(h, gathered), 2, n)


__all__ = ["fold_state", "mlstm_context_parallel", "mlstm_state_summary"]

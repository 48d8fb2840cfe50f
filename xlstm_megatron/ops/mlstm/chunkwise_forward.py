"""Chunkwise mLSTM forward: gate bookkeeping and the forward pass on chunked, head-flattened tensors.

Layout: every tensor here is (BH, NC, L, ...) with BH = B * NH, NC chunks of length L, in the compute dtype.
Gates, per chunk: b_j = cumulative log sigmoid(f) inside the chunk, u_j = i_j - b_j. Log weight of source j at row i
(j <= i, same chunk): b_i + u_j; of the chunk-start state at row i: b_i + M_{c-1}; of source j in the chunk-end state:
b_L + u_j. All stabilisers follow from x_i = max(M_{c-1}, max_{j<=i} u_j):
  m_i = b_i + x_i (row stabiliser, equal to the recurrent m_t), M_c = b_L + x_L (state stabiliser),
so every stabilised exponent is a difference `u_j - x_i` or `M_{c-1} - x_i`, which is <= 0 in exact float arithmetic.

Packed documents (`starts`, true at each document's first token): a chunk splits into segments at its starts, segment
0 continuing the chunk-start state. b restarts at each start (it includes log f of the start token itself), so
b_i - b_j is only ever formed inside a segment and no -inf enters the bookkeeping. A later segment begins from the
empty state of a fresh start, whose stabiliser is 0: x_i = max(0, max_{j<=i in segment} u_j), giving
m_start = max(log f_start, i_start) as the recurrent form from m_0 = 0. Pairs across segments, the chunk-start state
in rows past a start, sources before the last segment in the chunk-end state and the carry over a chunk containing a
start all get weight exactly 0 (their exponents are masked to -inf before exp).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xlstm_megatron.ops.mlstm.common import normaliser_floor, segmented_scan


@dataclass
class ChunkGates:
    """Stabilised gate quantities of a chunked sequence (see module docstring)."""

    u: Tensor  # (BH, NC, L) i_j - b_j
    x: Tensor  # (BH, NC, L) m_i - b_i
    m: Tensor  # (BH, NC, L) row stabiliser
    M: Tensor  # (BH, NC + 1) state stabiliser: M[:, 0] = m0, M[:, c + 1] after chunk c
    starts: Tensor | None = None  # (BH, NC, L) bool document starts (packed sequences), None: no resets
    seg: Tensor | None = None  # (BH, NC, L) segment index inside the chunk: cumulative count of starts

    def detached(self) -> "ChunkGates":
        return ChunkGates(self.u.detach(), self.x.detach(), self.m.detach(), self.M.detach(), self.starts, self.seg)

    def decay(self, scale: float) -> Tensor:
        """(BH, NC, L, L): scale * exp(b_i - b_j + i_j - m_i) for j <= i in the same segment, else 0."""
        L = self.u.shape[-1]
        log_d = (self.u[..., None, :] + math.log(scale)) - self.x[..., :, None]
        hidden = ~torch.ones(L, L, dtype=torch.bool, device=self.u.device).tril()
        if self.seg is not None:
            hidden = hidden | (self.seg[..., :, None] != self.seg[..., None, :])
        return log_d.masked_fill_(hidden, float("-inf")).exp_()

    def read(self, scale: float) -> Tensor:
        """(BH, NC, L): scale * exp(b_i + M_{c-1} - m_i), weight of the chunk-start state in row i."""
        log_w = self.M[:, :-1, None] - self.x
        if self.seg is not None:
            log_w = log_w.masked_fill(self.seg > 0, float("-inf"))
        return torch.exp(log_w) * scale

    def write(self) -> Tensor:
        """(BH, NC, L): exp(b_L - b_j + i_j - M_c), weight of source j in the chunk-end state."""
        log_w = self.u - self.x[..., -1:]
        if self.seg is not None:
            log_w = log_w.masked_fill(self.seg != self.seg[..., -1:], float("-inf"))
        return torch.exp(log_w)

    def carry(self) -> Tensor:
        """(BH, NC): exp(b_L + M_{c-1} - M_c), decay of the chunk-start state into the chunk-end state."""
        log_w = self.M[:, :-1] - self.x[..., -1]
        if self.seg is not None:
            log_w = log_w.masked_fill(self.seg[..., -1] > 0, float("-inf"))
        return torch.exp(log_w)


def chunk_gates(i: Tensor, log_f: Tensor, m0: Tensor, starts: Tensor | None = None) -> ChunkGates:
    """i, log_f (BH, NC, L) input-gate pre-activations and log sigmoid(f); m0 (BH,) initial stabiliser; starts
    (BH, NC, L) bool document starts or None.

    Differentiable (the exact backward routes the stabiliser gradient through it). Padding positions must carry
    log_f = 0 and i = -inf (and no start): they then change neither the states nor any real row.
    """
    if starts is not None:
        return _segmented_chunk_gates(i, log_f, m0, starts)
    b = log_f.cumsum(-1)
    u = i - b
    u_cummax = u.cummax(-1).values
    g, u_max = b[..., -1], u_cummax[..., -1]
    Ms = [m0]
    for c in range(u.shape[1]):  # NC tiny (BH,) ops: the state stabiliser is a max-plus scan over chunks
        Ms.append(g[:, c] + torch.maximum(Ms[-1], u_max[:, c]))
    M = torch.stack(Ms, dim=1)
    x = torch.maximum(M[:, :-1, None], u_cummax)
    return ChunkGates(u=u, x=x, m=b + x, M=M)


def _segmented_chunk_gates(i: Tensor, log_f: Tensor, m0: Tensor, starts: Tensor) -> ChunkGates:
    """`chunk_gates` with the recurrence restarted at every start (module docstring): segment-local b and running
    max of u, and the previous stabiliser 0 (a fresh start's m_0) instead of M_{c-1} past a start."""
    seg = starts.cumsum(-1)
    b = segmented_scan(log_f, starts, torch.add, 0.0)
    u = i - b
    u_cummax = segmented_scan(u, starts, torch.maximum, float("-inf"))
    g, u_max, continues = b[..., -1], u_cummax[..., -1], seg[..., -1] == 0
    Ms = [m0]
    for c in range(u.shape[1]):
        prev = torch.where(continues[:, c], Ms[-1], 0.0)
        Ms.append(g[:, c] + torch.maximum(prev, u_max[:, c]))
    M = torch.stack(Ms, dim=1)
    x = torch.maximum(torch.where(seg == 0, M[:, :-1, None], 0.0), u_cummax)
    return ChunkGates(u=u, x=x, m=b + x, M=M, starts=starts, seg=seg)


def chunkwise_states(
    k: Tensor, v: Tensor, gates: ChunkGates, C0: Tensor, n0: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inter-chunk states: C_start (BH, NC, DQK, DV) and n_start (BH, NC, DQK), the states before each chunk, and the
    final C (BH, DQK, DV), n (BH, DQK). One batched matmul for all chunk contributions, then a short loop over chunks
    (contiguous per-chunk blocks, so the later matmuls need no copies)."""
    NC = k.shape[1]
    kw = k * gates.write()[..., None]
    C_in, n_in = kw.transpose(-2, -1) @ v, kw.sum(-2)  # what each chunk adds to the state after it
    carry = gates.carry()
    C_start, n_start = torch.empty_like(C_in), torch.empty_like(n_in)
    C_start[:, 0], n_start[:, 0] = C0, n0
    for c in range(NC - 1):
        torch.addcmul(C_in[:, c], C_start[:, c], carry[:, c, None, None], out=C_start[:, c + 1])
        torch.addcmul(n_in[:, c], n_start[:, c], carry[:, c, None], out=n_start[:, c + 1])
    C_final = torch.addcmul(C_in[:, -1], C_start[:, -1], carry[:, -1, None, None])
    n_final = torch.addcmul(n_in[:, -1], n_start[:, -1], carry[:, -1, None])
    return C_start, n_start, C_final, n_final


def chunkwise_forward(
    q: Tensor, k: Tensor, v: Tensor, gates: ChunkGates, C0: Tensor, n0: Tensor, eps: float
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """q, k (BH, NC, L, DQK), v (BH, NC, L, DV), C0 (BH, DQK, DV), n0 (BH, DQK).

    Returns h (BH, NC, L, DV), the denominator q.n before max/abs (BH, NC, L), and the states of `chunkwise_states`.
    """
    scale = q.shape[-1] ** -0.5
    states = C_start, n_start, _, _ = chunkwise_states(k, v, gates, C0, n0)
    s_bar = (q @ k.transpose(-2, -1)).mul_(gates.decay(scale))  # (BH, NC, L, L)
    q_read = q * gates.read(scale)[..., None]
    num = (q_read @ C_start).add_(s_bar @ v)
    den = s_bar.sum(-1) + (q_read @ n_start[..., None])[..., 0]
    normaliser = torch.maximum(den.abs(), normaliser_floor(gates.m))
    h = num.div_((normaliser + eps)[..., None])
    return h, den, states

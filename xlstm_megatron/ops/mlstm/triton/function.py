"""Triton chunkwise mLSTM: autograd Function and the public `mlstm_chunkwise_triton` (contract of `mlstm_chunkwise`).

Forward: the torch side builds the per-chunk gate vectors (O(S) elementwise work); kernel 1 scans the chunk states
(C, n, M) sequentially over chunks in fp32, parallel over heads and (DQK, DV) tiles; kernel 2 computes h for all
chunks in parallel. Saved for backward: the inputs, the stabiliser before every chunk, q.n and m per row (and h for
the exact semantics), and either the fp32 states before every chunk or, by default (as TFLA), nothing more: backward
re-runs the state scan. The saved states take 2 * DQK * DV / (L * (2 * DQK + DV)) times the bytes of bf16 q, k, v
(4x at the xLSTM 7B heads with L = 64), the re-run scan one of the six kernels' time. When they are not kept, the
forward does not hold them all either: it scans and reads out segments of chunks whose states take at most the bytes
of v (`segment_chunks`), e.g. 8 segments at the 7B heads, L = 64, whatever the length. Backward: a reverse scan for
the state gradients, then dq, dk, dv in parallel over chunks, each recomputing its L x L blocks; the gate gradients
follow from q.dq and k.dk row sums (see chunkwise_backward.py).
Packed documents (`doc_starts`): the gate vectors come from segmented scans and the kernels get the segment index per
row (kernels_forward.py); without them the kernels are compiled without any of that code.
"""

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from xlstm_megatron.ops.mlstm.chunkwise_forward import chunk_gates
from xlstm_megatron.ops.mlstm.common import MLSTMState, check_doc_starts, check_shapes, segmented_scan
from xlstm_megatron.ops.mlstm.triton.launch import check_grid, dtype_meta, launch, max_dqk_tiles, use_autotune

F32 = torch.float32
# exp(-m) is clamped at exp(88) (finite in fp32; ln(FLT_MAX) rounds up to a value whose exp is inf), as the kernels do
FLOOR_MAX_EXPONENT = 88.0


def finite_floor(m: Tensor) -> Tensor:
    """exp(-m), the normaliser's lower bound, clamped to a finite fp32 value (it only matters where h is ~1e-38)."""
    return torch.exp(torch.clamp(-m, max=FLOOR_MAX_EXPONENT))


def segment_chunks(BH: int, NC: int, DQK: int, DV: int, v_bytes: int) -> int:
    """Chunks per forward segment when the states are not kept: their fp32 states take at most the bytes of v."""
    per_chunk = BH * (DQK * DV + DQK) * 4
    return max(1, min(NC, v_bytes // per_chunk))


def _state_buffers(BH: int, chunks: int, DQK: int, DV: int, dev) -> tuple[Tensor, Tensor]:
    """fp32 C, n before each of `chunks` chunks."""
    return (torch.empty(BH, chunks, DQK, DV, device=dev, dtype=F32),
            torch.empty(BH, chunks, DQK, device=dev, dtype=F32))


def _chunk_starts(doc_starts: Tensor | None, NH: int, L: int, NC: int) -> Tensor | None:
    """(B, S) document starts -> (BH, NC, L) bool, per head; padding tokens start nothing."""
    if doc_starts is None:
        return None
    B, S = doc_starts.shape
    starts = doc_starts[:, None].expand(B, NH, S).reshape(B * NH, S)
    return F.pad(starts, (0, NC * L - S), value=False).view(B * NH, NC, L)


def _gate_vectors(i: Tensor, f: Tensor, L: int, NC: int, starts: Tensor | None = None) -> tuple[Tensor, ...]:
    """i, f (B, NH, S) -> padded input gates, log sigmoid(f), and b, u, ucm (see kernels_forward.py), all
    (BH, NC, L) fp32; padding tokens (i = -inf, log f = 0) change no state and no real row. With `starts` (BH, NC, L)
    bool, b and ucm restart at each start and the last item is the segment index (BH, NC, L) int32 (else None)."""
    S = i.shape[-1]
    ic, lf = i.to(F32).reshape(-1, S), F.logsigmoid(f.to(F32)).reshape(-1, S)
    pad = NC * L - S
    if pad:
        ic, lf = F.pad(ic, (0, pad), value=float("-inf")), F.pad(lf, (0, pad), value=0.0)
    ic, lf = ic.view(-1, NC, L), lf.view(-1, NC, L)
    if starts is None:
        b = lf.cumsum(-1)
        u = ic - b
        return ic, lf, b, u, u.cummax(-1).values, None
    b = segmented_scan(lf, starts, torch.add, 0.0)
    u = ic - b
    ucm = segmented_scan(u, starts, torch.maximum, float("-inf"))
    return ic, lf, b, u, ucm, starts.cumsum(-1, dtype=torch.int32)


def _segmented_forget_grad(db: Tensor, final_terms: list[Tensor], starts: Tensor) -> Tensor:
    """d log sigmoid(f) (BH, S) with documents: the reverse sum of db = q.dq - k.dk stops at each document's end, the
    final-state terms (each (BH,)) reach only the tokens after the last start, and a start token gets 0 (its forget
    gate multiplies the empty state). starts (BH, S) bool."""
    ends = F.pad(starts[:, 1:], (0, 1), value=False)  # last token of each document but the row's last one
    dlog_f = segmented_scan(db.flip(-1), ends.flip(-1), torch.add, 0.0).flip(-1)
    if final_terms:
        after_last_start = starts.flip(-1).cumsum(-1).flip(-1) == 0
        for term in final_terms:
            dlog_f = dlog_f + term[:, None] * after_last_start
    return dlog_f.masked_fill(starts, 0.0)


class _Geometry:
    """Sizes of one call: BH heads, S tokens, NC chunks of L, head dims DQK, DV."""

    def __init__(self, q: Tensor, v: Tensor, chunk_size: int):
        B, NH, self.S, self.DQK = q.shape
        self.shape_bnh, self.BH, self.DV = (B, NH), B * NH, v.shape[-1]
        self.L = min(chunk_size, self.S)
        self.NC = -(-self.S // self.L)
        self.Sp = self.NC * self.L

    def chunk_grid(self, tile: str, dim: int, chunks: int | None = None):
        """Grid of the per-chunk kernels: (chunks x row blocks, tiles of `dim`, heads); all chunks by default."""
        chunks = self.NC if chunks is None else chunks
        return lambda meta: (chunks * triton.cdiv(self.L, meta["BL"]), triton.cdiv(dim, meta[tile]), self.BH)

    def scan_grid(self):
        return lambda meta: (triton.cdiv(self.DQK, meta["BK"]), triton.cdiv(self.DV, meta["BV"]), self.BH)


def _flat(t: Tensor, BH: int) -> Tensor:
    """(B, NH, S, D) -> contiguous (BH, S, D)."""
    return t.reshape(BH, *t.shape[2:]).contiguous()


def _initial_state(C0: Tensor | None, n0: Tensor | None, m0: Tensor | None, g: _Geometry, dev) -> tuple[Tensor, ...]:
    """The initial state as contiguous fp32 (BH, ...) tensors (zeros when none is given)."""
    if C0 is None:
        return tuple(torch.zeros(s, device=dev, dtype=F32) for s in ((g.BH, g.DQK, g.DV), (g.BH, g.DQK), (g.BH,)))
    return tuple(t.to(F32).reshape(g.BH, *t.shape[2:]).contiguous() for t in (C0, n0, m0))


def _scan_states(k_: Tensor, v_: Tensor, gates: tuple[Tensor, ...], state0: tuple[Tensor, ...],
                 g: _Geometry, meta: dict, tune: bool, Ms: Tensor, first: int = 0, end: int | None = None,
                 out: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
    """Kernel 1 over chunks first <= c < end (default: all), from state0 = (C, n, m) before chunk `first`: the fp32
    states before those chunks (Cs, ns), the stabilisers (into Ms) and the state after them (Cf, nf, written to
    `out` if given; it must not alias state0). gates: b, u, ucm, seg_ids (None without documents)."""
    end = g.NC if end is None else end
    b, u, ucm, seg_ids = gates
    C0_, n0_, m0_ = state0
    Cs, ns = _state_buffers(g.BH, end - first, g.DQK, g.DV, k_.device)
    Cf, nf = out if out is not None else (torch.empty_like(C0_), torch.empty_like(n0_))
    args = (k_, v_, u, ucm, b, seg_ids, C0_, n0_, m0_, Cs, ns, Ms, Cf, nf, g.S, g.NC, first, end, end - first)
    launch("fwd_states", g.scan_grid(), args, meta, tune)
    return Cs, ns, Cf, nf


class _MLSTMChunkwiseTriton(torch.autograd.Function):
    """Inputs q, k, v, i, f, C0, n0, m0 (state optional: all None), doc_starts (or None), chunk_size, eps, exact,
    recompute_states; outputs h, C, n, m."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, doc_starts, chunk_size: int, eps: float, exact: bool,
                recompute_states: bool):
        g = _Geometry(q, v, chunk_size)
        BH, S, DQK, DV, L, NC = g.BH, g.S, g.DQK, g.DV, g.L, g.NC
        _, _, b, u, ucm, seg_ids = _gate_vectors(i, f, L, NC, _chunk_starts(doc_starts, g.shape_bnh[1], L, NC))
        q_, k_, v_ = _flat(q, BH), _flat(k, BH), _flat(v, BH)
        dev = q.device
        state0 = _initial_state(C0, n0, m0, g, dev)
        meta = {"L": L, "DQK": DQK, "DV": DV, **dtype_meta(q.dtype)}
        tune = use_autotune(q)
        gates = (b, u, ucm, seg_ids)
        Ms = torch.empty(BH, NC + 1, device=dev, dtype=F32)
        h = torch.empty(BH, S, DV, device=dev, dtype=q.dtype)
        den = torch.empty(BH, g.Sp, device=dev, dtype=F32)
        m_rows = torch.empty_like(den)
        seg = segment_chunks(BH, NC, DQK, DV, v.numel() * v.element_size()) if recompute_states else NC
        ends = [(first, min(first + seg, NC)) for first in range(0, NC, seg)]
        # the state after a segment is the next one's start: two buffers in turn (a scan must not write its input)
        turns = [(torch.empty_like(state0[0]), torch.empty_like(state0[1])) for _ in range(min(2, len(ends)))]
        start = state0
        for j, (first, end) in enumerate(ends):
            Cs, ns, Cf, nf = _scan_states(k_, v_, gates, start, g, meta, tune, Ms, first, end, turns[j % 2])
            args = (q_, k_, v_, u, ucm, b, seg_ids, Cs, ns, Ms, h, den, m_rows, S, NC, first, end - first, DQK**-0.5,
                    eps)
            launch("fwd_out", g.chunk_grid("BV", DV, end - first), args, meta, tune)
            start = (Cf, nf, Ms[:, end].contiguous())

        h = h.view(*g.shape_bnh, S, DV)
        # recomputing needs the initial C, n (one state); otherwise the states before every chunk are kept
        saved_states = (state0[0], state0[1]) if recompute_states else (Cs, ns)  # one segment if kept
        ctx.save_for_backward(q_, k_, v_, i, f, state0[2], *saved_states, Ms, Cf, nf, den, m_rows,
                              h if exact else None, doc_starts)
        ctx.meta = (chunk_size, eps, exact, C0 is not None, tuple(t.dtype for t in (q, k, v, i, f)), recompute_states)
        ctx.state_dtypes = None if C0 is None else (C0.dtype, n0.dtype, m0.dtype)
        ctx.set_materialize_grads(False)
        m_S = Ms[:, NC].clone().view(g.shape_bnh)
        if not exact:
            ctx.mark_non_differentiable(m_S)
        return h, Cf.view(*g.shape_bnh, DQK, DV), nf.view(*g.shape_bnh, DQK), m_S

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, dC_S, dn_S, dm_S):
        q_, k_, v_, i, f, m0_, Cs, ns, Ms, Cf, nf, den, m_rows, h, doc_starts = ctx.saved_tensors
        chunk_size, eps, exact, has_state, dtypes, recompute_states = ctx.meta
        BH, S, DQK = q_.shape
        DV = v_.shape[-1]
        g = _Geometry(q_.view(1, BH, S, DQK), v_.view(1, BH, S, DV), chunk_size)
        L, NC, dev = g.L, g.NC, q_.device
        starts = _chunk_starts(doc_starts, i.shape[1], L, NC)
        ic, lf, b, u, ucm, seg_ids = _gate_vectors(i, f, L, NC, starts)
        meta = {"L": L, "DQK": DQK, "DV": DV, **dtype_meta(q_.dtype)}
        tune, scale = use_autotune(q_), DQK**-0.5
        if recompute_states:  # Cs, ns hold the initial C, n: re-run kernel 1 (deterministic: the same states)
            Cs, ns = _scan_states(k_, v_, (b, u, ucm, seg_ids), (Cs, ns, m0_), g, meta, tune, Ms.clone())[:2]

        floor = finite_floor(m_rows)
        norm = torch.maximum(den.abs(), floor) + eps
        dh_ = torch.zeros_like(v_) if dh is None else dh.reshape(BH, S, DV).contiguous()
        dden = hdh = None
        if exact:  # h = num / (max(|den|, floor) + eps): the normaliser's own gradient, per row
            hdh = F.pad((dh_.to(F32) * h.reshape(BH, S, DV).to(F32)).sum(-1), (0, g.Sp - S)) / norm
            dden = torch.where(den.abs() > floor, -hdh * den.sign(), torch.zeros_like(hdh))

        has_dcf, has_dnf = dC_S is not None, dn_S is not None
        has_n = has_dnf or exact
        dCf = dC_S.to(F32).reshape(BH, DQK, DV).contiguous() if has_dcf else norm
        dnf = dn_S.to(F32).reshape(BH, DQK).contiguous() if has_dnf else norm
        dCs = torch.empty_like(Cs)
        dns = torch.empty_like(ns) if has_n else norm
        dC0 = torch.empty(BH, DQK, DV, device=dev, dtype=F32)
        dn0 = torch.empty(BH, DQK, device=dev, dtype=F32) if has_n else norm
        dden_arg = norm if dden is None else dden
        flags = {"HAS_DCF": has_dcf, "HAS_DNF": has_dnf, "HAS_DDEN": exact}
        args = (q_, dh_, ucm, seg_ids, norm, dden_arg, Ms, dCf, dnf, dCs, dns, dC0, dn0, S, NC, scale)
        launch("bwd_states", g.scan_grid(), args, {**meta, **flags}, tune)

        dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
        # per-DQK-tile partial sums; zeros where the tuned tiles are larger than the smallest candidate's
        qdq = torch.zeros(max_dqk_tiles(meta, tune), BH, g.Sp, device=dev, dtype=F32)
        kdk = torch.zeros_like(qdq)
        args = (q_, k_, v_, dh_, u, ucm, seg_ids, norm, dden_arg, Cs, ns, Ms, dq, qdq, S, NC, scale)
        launch("bwd_dq", g.chunk_grid("BK", DQK), args, {**meta, "HAS_DDEN": exact}, tune)
        args = (q_, k_, v_, dh_, u, ucm, seg_ids, norm, dden_arg, dCs, dns, Ms, dk, kdk, S, NC, scale)
        launch("bwd_dk", g.chunk_grid("BK", DQK), args, {**meta, "HAS_N": has_n, "HAS_DDEN": exact}, tune)
        args = (q_, k_, dh_, u, ucm, seg_ids, norm, dCs, Ms, dv, S, NC, scale)
        launch("bwd_dv", g.chunk_grid("BV", DV), args, meta, tune)

        q_dq = qdq.sum(0)[:, :S]
        di = kdk.sum(0)[:, :S]
        # the final state carries every log f (after the last start): <dC_S, C_S> + <dn_S, n_S> reaches those tokens
        final_terms = ([(dCf * Cf).sum((-2, -1))] if has_dcf else []) + ([(dnf * nf).sum(-1)] if has_dnf else [])
        if starts is None:
            dlog_f = (q_dq - di).flip(-1).cumsum(-1).flip(-1)
            for term in final_terms:
                dlog_f = dlog_f + term[:, None]
        else:
            dlog_f = _segmented_forget_grad(q_dq - di, final_terms, starts.view(BH, -1)[:, :S])

        dm0 = None
        if exact:  # the stabilisers enter h only through eps (see chunkwise.py): autograd through the gate graph
            with torch.enable_grad():
                ic, lf, m0_g = (t.detach().requires_grad_() for t in (ic, lf, m0_))
                gates = chunk_gates(ic, lf, m0_g, starts)
                m_rows_graph, m_final_graph = gates.m, gates.M[:, -1]
            dM_S = torch.zeros_like(m0_) if dm_S is None else dm_S.to(F32).reshape(BH)
            if has_dcf:
                dM_S = dM_S - (dCf * Cf).sum((-2, -1))
            if has_dnf:
                dM_S = dM_S - (dnf * nf).sum(-1)
            dm_rows = (-hdh * eps).view(BH, NC, L)
            di_m, dlf_m, dm0_m = torch.autograd.grad((m_rows_graph, m_final_graph), (ic, lf, m0_g), (dm_rows, dM_S))
            di = di + di_m.reshape(BH, -1)[:, :S]
            dlog_f = dlog_f + dlf_m.reshape(BH, -1)[:, :S]
            if has_state:
                dm0 = dm0_m + (dC0 * Cs[:, 0]).sum((-2, -1)) + (dn0 * ns[:, 0]).sum(-1)

        shape_bnh = i.shape[:2]
        dq_t, dk_t, dv_t = (t.view(*shape_bnh, *t.shape[1:]) for t in (dq, dk, dv))
        di_t = di.view(i.shape).to(dtypes[3])
        df_t = (dlog_f.view(f.shape) * torch.sigmoid(-f.to(F32))).to(dtypes[4])
        grads_state = (None, None, None)
        if has_state:
            C_dt, n_dt, m_dt = ctx.state_dtypes
            grads_state = (
                dC0.view(*shape_bnh, DQK, DV).to(C_dt),
                dn0.view(*shape_bnh, DQK).to(n_dt) if has_n else None,
                None if dm0 is None else dm0.view(shape_bnh).to(m_dt),
            )
        return dq_t, dk_t, dv_t, di_t, df_t, *grads_state, None, None, None, None, None


def mlstm_chunkwise_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: MLSTMState | None = None,
    return_final_state: bool = False,
    backward: Literal["exact", "constant"] = "exact",
    eps: float = 1e-6,
    recompute_states: bool = True,
    doc_starts: Tensor | None = None,
) -> Tensor | tuple[Tensor, MLSTMState]:
    """Triton chunkwise mLSTM with the contract of `xlstm_megatron.ops.mlstm.mlstm_chunkwise`.

    q, k (B, NH, S, DQK) and v (B, NH, S, DV) of one dtype (fp32, fp16 or bf16); i, f (B, NH, S) gate
    pre-activations (any float dtype); `initial_state` (C, n, m) as in `MLSTMState`. Any S >= 1, chunk size and head
    sizes (tiles are masked). Returns h (B, NH, S, DV) in q's dtype and, with `return_final_state`, the fp32 state
    after the last token. Accumulation and states are fp32; for fp32 inputs the dots are full fp32 (no TF32).
    `backward`: "exact" (the default of every form) or "constant" (normaliser and stabilisers held fixed, as TFLA /
    xLSTM 7B training; the Large config's default).
    `recompute_states` (Triton only): backward re-runs the state scan instead of keeping the fp32 state before every
    chunk (see the module docstring for the memory it saves).
    `doc_starts`: optional bool (B, S), true at each document's first token (packed sequences): the state restarts
    empty there, as in `mlstm_chunkwise`; `initial_state` feeds the first document unless position 0 is marked.
    """
    check_shapes(q, k, v, i, f)
    check_doc_starts(doc_starts, (q.shape[0], q.shape[2]))
    if doc_starts is not None and doc_starts.device != q.device:
        raise ValueError(f"doc_starts must be on q's device {q.device}, got {doc_starts.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    dtype_meta(q.dtype)  # raises for unsupported dtypes
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if q.shape[2] < 1:
        raise ValueError("mlstm_chunkwise_triton needs a sequence of at least one token")
    if backward not in ("exact", "constant"):
        raise ValueError(f"backward must be 'exact' or 'constant', got {backward!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    check_grid(q.shape[0] * q.shape[1])
    C0, n0, m0 = (None, None, None) if initial_state is None else initial_state
    # Triton launches on the current CUDA device (autograd's backward threads already run on the tensors' device)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        h, C, n, m = _MLSTMChunkwiseTriton.apply(
            q, k, v, i, f, C0, n0, m0, doc_starts, chunk_size, eps, backward == "exact", recompute_states
        )
    return (h, (C, n, m)) if return_final_state else h

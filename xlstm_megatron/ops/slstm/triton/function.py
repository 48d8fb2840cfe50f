"""Fused Triton sLSTM: autograd Function around the forward / backward time-loop kernels (see kernels.py, launch.py).

Forward saves the fp32 pre-activations and the per-step states (the torch path saves the same); backward runs the
reverse time loop in one kernel and leaves the reductions over batch and time (dR, db, dy_0) to matmuls. Any head
size runs: tiles do not grow with DH (see launch.py for how the programs of a head are ordered).

Packed documents (``doc_starts``) go to the kernels as an fp32 (B, S) flag tensor under the DOCS variant; without
them the kernels are the ones compiled before (no flag is loaded).
"""

import contextlib
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from xlstm_megatron.ops.mlstm.common import check_doc_starts
from xlstm_megatron.ops.slstm.common import ForgetGate, SLSTMState, check_inputs, zero_state
from xlstm_megatron.ops.slstm.triton import launch
from xlstm_megatron.ops.slstm.triton.kernels import slstm_bwd_kernel, slstm_fwd_kernel

F32 = torch.float32
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _SLSTMTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wx: Tensor, r: Tensor, b: Tensor, y0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor,
                exp_forget: bool, doc_starts: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        bsz, seq, nh, _, dh = wx.shape
        dev = wx.device
        wx_c, r_c, b_c = wx.contiguous(), r.contiguous(), b.contiguous()
        ctx.dtypes = tuple(x.dtype for x in (wx, r, b, y0, c0, n0, m0))
        zero_n = n0 == 0.0
        # fp32 flags: the pointer type the resource audit compiles (tests/ops/kernel_resources.py)
        starts = None if doc_starts is None else doc_starts.to(device=dev, dtype=F32).contiguous()
        if starts is not None and seq > 0:  # as the reference: rows restarting at t = 0 see n = 0 in the test
            zero_n = zero_n | (starts[:, 0, None, None] != 0.0)
        first_zero = torch.all(zero_n).to(torch.int32).reshape(1)  # a tensor: no host sync
        raw = torch.empty(bsz, seq, nh, 4, dh, dtype=F32, device=dev)
        ys, cs, ns, ms = (torch.empty(bsz, seq + 1, nh, dh, dtype=F32, device=dev) for _ in range(4))
        for hist, s0 in zip((ys, cs, ns, ms), (y0, c0, n0, m0), strict=True):
            hist[:, 0] = s0
        starts_arg = raw if starts is None else starts  # without DOCS never read: any fp32 tensor
        launch.run(
            slstm_fwd_kernel,
            lambda t0, t1, bar: (wx_c, r_c, b_c, first_zero, bar, starts_arg, raw, ys, cs, ns, ms,
                                 bsz, seq, nh, dh, t0, t1),
            (bsz, seq, nh, dh), exp_forget, first_zero, docs=starts is not None,
        )
        ctx.save_for_backward(r_c, raw, ys, cs, ns, ms, first_zero, starts)
        ctx.exp_forget = exp_forget
        # copies: outputs must not share storage with the saved states (an in-place edit would break the backward)
        y = ys[:, 1:].to(dtype=wx.dtype, memory_format=torch.contiguous_format, copy=True)
        final = (s[:, seq].to(memory_format=torch.contiguous_format, copy=True) for s in (ys, cs, ns, ms))
        return y, *final

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: Tensor, g_y_last: Tensor, g_c_last: Tensor, g_n_last: Tensor, g_m_last: Tensor):
        r_c, raw, ys, cs, ns, ms, first_zero, starts = ctx.saved_tensors
        bsz, seq, nh, _, dh = raw.shape
        dev = raw.device
        g_y, g_y_last = (g.to(F32).contiguous() for g in (g_y, g_y_last))
        # carried in place by the kernel: the final state's gradients in, the initial state's out
        g_c, g_n, g_m = (g.to(F32, copy=True).contiguous() for g in (g_c_last, g_n_last, g_m_last))
        g_wx = torch.empty(bsz, seq, nh, 4, dh, dtype=F32, device=dev)
        starts_arg = raw if starts is None else starts
        launch.run(
            slstm_bwd_kernel,
            lambda t0, t1, bar: (r_c, raw, ys, cs, ns, ms, first_zero, bar, starts_arg, g_y, g_y_last, g_c, g_n, g_m,
                                 g_wx, bsz, seq, nh, dh, t0, t1),
            (bsz, seq, nh, dh), ctx.exp_forget, first_zero, reverse=True, docs=starts is not None,
        )
        dt = ctx.dtypes
        with torch.autocast(device_type=dev.type, enabled=False):  # fp32 reductions, like the torch path
            r32 = r_c.to(F32)
            y_prev = ys[:, :seq]
            if starts is not None:  # the y_{t-1} that entered y_{t-1} R: 0 in rows starting a document at t
                y_prev = y_prev.masked_fill(starts[:, :, None, None] != 0.0, 0.0)
            g_y0 = torch.einsum("bhge,hdge->bhd", g_wx[:, 0], r32) if seq else g_y_last
            if starts is not None and seq:
                g_y0 = g_y0.masked_fill(starts[:, 0, None, None] != 0.0, 0.0)
            g_r = torch.einsum("bthd,bthge->hdge", y_prev, g_wx) if ctx.needs_input_grad[1] else None
            g_b = g_wx.sum(dim=(0, 1)) if ctx.needs_input_grad[2] else None
        grads = (g_wx, g_r, g_b, g_y0, g_c, g_n, g_m)
        return *(None if g is None else g.to(d) for g, d in zip(grads, dt, strict=True)), None, None


def slstm_triton(
    wx: Tensor,
    r: Tensor,
    b: Tensor,
    *,
    initial_state: SLSTMState | None = None,
    forget_gate: ForgetGate = "sigmoid",
    doc_starts: Tensor | None = None,
) -> tuple[Tensor, SLSTMState]:
    """Fused Triton sLSTM over a sequence (same contract and math as ``slstm`` / ``slstm_reference``).

    Args:
        wx: (B, S, NH, 4, DH) input contributions W x (no bias), gates (i, f, z, o); fp32, fp16 or bf16.
        r: (NH, DH, 4, DH) block-diagonal recurrent weights; b: (NH, 4, DH) gate biases (any float dtype).
        initial_state: (y, c, n, m), each (B, NH, DH); zeros if None. Must be a valid state (n >= 0).
        forget_gate: "sigmoid" (official v1) or "exp" (paper variant).
        doc_starts: optional bool (B, S), true at each document's first token: the state restarts from zero there
            (``initial_state`` feeds the first document unless position 0 is marked).

    Returns:
        y (B, S, NH, DH) in wx.dtype and the final state (y, c, n, m) in fp32; all math runs in fp32.
        Differentiable w.r.t. wx, r, b and the initial state (first order only; state gradients come back in fp32).

    Raises:
        ValueError: bad shapes / options (also of ``doc_starts``), sizes beyond the grid limits, or CPU tensors without
            the interpreter;
        TypeError: wx dtype not fp32/fp16/bf16.
    """
    bsz, seq, nh, dh = check_inputs(wx, r, b, initial_state, forget_gate)
    check_doc_starts(doc_starts, (bsz, seq))
    if wx.dtype not in _DTYPES:
        raise TypeError(f"slstm_triton takes fp32, fp16 or bf16 wx, got {wx.dtype} (use the torch path)")
    if not wx.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("slstm_triton needs CUDA tensors (or TRITON_INTERPRET=1); use the torch path on CPU")
    launch.check_sizes(bsz, seq, nh, dh)
    if initial_state is None:
        initial_state = zero_state(bsz, nh, dh, F32, wx.device)
    # Triton launches on the current CUDA device (autograd's backward threads already run on the tensors' device)
    with torch.cuda.device(wx.device) if wx.is_cuda else contextlib.nullcontext():
        y, *final = _SLSTMTritonFunction.apply(wx, r, b, *initial_state, forget_gate == "exp", doc_starts)
    return y, tuple(final)  # type: ignore[return-value]

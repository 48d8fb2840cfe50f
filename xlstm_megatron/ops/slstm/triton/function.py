"""Fused Triton sLSTM: autograd Function and `slstm_triton` (the contract of `xlstm_megatron.ops.slstm.slstm`).

Forward: one kernel, one program per (batch tile of BATCH_TILE, head), the time loop inside; it saves the raw gate
pre-activations and the states after every step (fp32). Backward: one kernel running the reverse time loop over the
saved values (no recomputation of the recurrent matmul) gives the gate gradients and dL/d(initial state); the R and
bias gradients are then one batched matmul / sum over them (parallel work kept out of the sequential loop).

Supported head sizes: DH <= MAX_DH = 128, padded to a power of two >= 16 inside the kernels. A head's recurrent weights
(4 x D x D fp32) stay in registers for the whole loop: up to D = 64 they fit; at D = 128 expect register spills on a
GPU (correct, slower). Larger heads raise ValueError: the caller falls back to the torch path.
"""

import os

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from xlstm_megatron.ops.slstm.common import ForgetGate, SLSTMState, check_inputs, zero_state
from xlstm_megatron.ops.slstm.triton.kernels import slstm_bwd_kernel, slstm_fwd_kernel

MAX_DH = 128
BATCH_TILE = 16  # tl.dot needs blocks >= 16: batch rows of one program (padded)
MIN_D = 16
F32 = torch.float32
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _meta(dh: int, exp_forget: bool) -> dict:
    d = max(MIN_D, triton.next_power_of_2(dh))
    return {"BB": BATCH_TILE, "D": d, "EXP_FORGET": exp_forget, "num_warps": 4 if d <= 64 else 8}


class _SLSTMTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wx: Tensor, r: Tensor, b: Tensor, y0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor,
                exp_forget: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        bsz, seq, nh, _, dh = wx.shape
        dev = wx.device
        wx_c, r_c, b_c = wx.contiguous(), r.contiguous(), b.contiguous()
        ctx.dtypes = tuple(x.dtype for x in (wx, r, b, y0, c0, n0, m0))
        y0, c0, n0, m0 = (s.to(F32).contiguous() for s in (y0, c0, n0, m0))
        first_zero = torch.all(n0 == 0.0).to(torch.int32).reshape(1)  # a tensor: no host sync
        raw = torch.empty(bsz, seq, nh, 4, dh, dtype=F32, device=dev)
        ys, cs, ns, ms = (torch.empty(bsz, seq + 1, nh, dh, dtype=F32, device=dev) for _ in range(4))
        meta = _meta(dh, exp_forget)
        grid = (triton.cdiv(bsz, meta["BB"]), nh)
        slstm_fwd_kernel[grid](wx_c, r_c, b_c, y0, c0, n0, m0, first_zero, raw, ys, cs, ns, ms,
                               bsz, seq, nh, dh, **meta)
        ctx.save_for_backward(r_c, raw, ys, cs, ns, ms, first_zero)
        ctx.meta, ctx.grid = meta, grid
        # copies: outputs must not share storage with the saved states (an in-place edit would break the backward)
        y = ys[:, 1:].to(dtype=wx.dtype, memory_format=torch.contiguous_format, copy=True)
        final = (s[:, seq].to(memory_format=torch.contiguous_format, copy=True) for s in (ys, cs, ns, ms))
        return y, *final

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: Tensor, g_y_last: Tensor, g_c_last: Tensor, g_n_last: Tensor, g_m_last: Tensor):
        r_c, raw, ys, cs, ns, ms, first_zero = ctx.saved_tensors
        bsz, seq, nh, _, dh = raw.shape
        dev = raw.device
        g_y, g_y_last, g_c_last, g_n_last, g_m_last = (
            g.to(F32).contiguous() for g in (g_y, g_y_last, g_c_last, g_n_last, g_m_last)
        )
        g_wx = torch.empty(bsz, seq, nh, 4, dh, dtype=F32, device=dev)
        g_y0, g_c0, g_n0, g_m0 = (torch.empty(bsz, nh, dh, dtype=F32, device=dev) for _ in range(4))
        slstm_bwd_kernel[ctx.grid](r_c, raw, ys, cs, ns, ms, first_zero, g_y, g_y_last, g_c_last, g_n_last, g_m_last,
                                   g_wx, g_y0, g_c0, g_n0, g_m0, bsz, seq, nh, dh, **ctx.meta)
        dt = ctx.dtypes
        with torch.autocast(device_type=dev.type, enabled=False):  # fp32 reductions, like the torch path
            g_r = torch.einsum("bthd,bthge->hdge", ys[:, :seq], g_wx) if ctx.needs_input_grad[1] else None
            g_b = g_wx.sum(dim=(0, 1)) if ctx.needs_input_grad[2] else None
        grads = (g_wx, g_r, g_b, g_y0, g_c0, g_n0, g_m0)
        return *(None if g is None else g.to(d) for g, d in zip(grads, dt, strict=True)), None


def slstm_triton(
    wx: Tensor,
    r: Tensor,
    b: Tensor,
    *,
    initial_state: SLSTMState | None = None,
    forget_gate: ForgetGate = "sigmoid",
) -> tuple[Tensor, SLSTMState]:
    """Fused Triton sLSTM over a sequence (same contract and math as ``slstm`` / ``slstm_reference``).

    Args:
        wx: (B, S, NH, 4, DH) input contributions W x (no bias), gates (i, f, z, o); fp32, fp16 or bf16.
        r: (NH, DH, 4, DH) block-diagonal recurrent weights; b: (NH, 4, DH) gate biases (any float dtype).
        initial_state: (y, c, n, m), each (B, NH, DH); zeros if None. Must be a valid state (n >= 0).
        forget_gate: "sigmoid" (official v1) or "exp" (paper variant).

    Returns:
        y (B, S, NH, DH) in wx.dtype and the final state (y, c, n, m) in fp32; all math runs in fp32.
        Differentiable w.r.t. wx, r, b and the initial state (first order only; state gradients come back in fp32).

    Raises:
        ValueError: bad shapes / options, DH > MAX_DH or CPU tensors without the interpreter (use the torch path);
        TypeError: wx dtype not fp32/fp16/bf16.
    """
    bsz, _, nh, dh = check_inputs(wx, r, b, initial_state, forget_gate)
    if wx.dtype not in _DTYPES:
        raise TypeError(f"slstm_triton takes fp32, fp16 or bf16 wx, got {wx.dtype} (use the torch path)")
    if dh > MAX_DH:
        raise ValueError(f"slstm_triton supports head sizes DH <= {MAX_DH}, got {dh} (use the torch path)")
    if not wx.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("slstm_triton needs CUDA tensors (or TRITON_INTERPRET=1); use the torch path on CPU")
    if initial_state is None:
        initial_state = zero_state(bsz, nh, dh, F32, wx.device)
    y, *final = _SLSTMTritonFunction.apply(wx, r, b, *initial_state, forget_gate == "exp")
    return y, tuple(final)  # type: ignore[return-value]

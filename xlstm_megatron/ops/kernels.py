"""Choose the implementation of the mLSTM and sLSTM cells: our Triton kernels on CUDA, the torch paths elsewhere.

`kernel="auto"` takes Triton for CUDA tensors of fp32/fp16/bf16 when triton imports (and, for the sLSTM, the head
fits the kernel), else torch. `"triton"` insists (a one-line error where it cannot run); `"torch"` never uses Triton.
The Triton packages are imported only when chosen.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from xlstm_megatron.ops.mlstm.chunkwise import mlstm_chunkwise
from xlstm_megatron.ops.slstm import slstm

Kernel = Literal["auto", "torch", "triton"]
KERNELS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_device_ok(x: Tensor) -> bool:
    return x.dtype in _TRITON_DTYPES and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _choose(kernel: str, usable: bool, what: str, why: str) -> bool:
    if kernel not in KERNELS:
        raise ValueError(f"{what} kernel {kernel!r} is unknown; use 'auto', 'torch' or 'triton'")
    if kernel == "triton" and not usable:
        raise ValueError(f"the Triton {what} kernel cannot run here ({why}); use kernel 'auto' or 'torch'")
    return kernel == "triton" or (kernel == "auto" and usable)


def mlstm_chunkwise_kernel(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, *, kernel: Kernel = "auto",
                           **kwargs) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """`mlstm_chunkwise` (same arguments and result) on the implementation `kernel` selects."""
    usable = _triton_device_ok(q)
    if usable:
        from xlstm_megatron.ops.mlstm.triton import TRITON_AVAILABLE

        usable = TRITON_AVAILABLE
    if not _choose(kernel, usable, "mLSTM", f"needs CUDA tensors of fp32/fp16/bf16 and triton; got {q.device}, "
                                            f"{q.dtype}"):
        return mlstm_chunkwise(q, k, v, i, f, **kwargs)
    from xlstm_megatron.ops.mlstm.triton import mlstm_chunkwise_triton

    return mlstm_chunkwise_triton(q, k, v, i, f, **kwargs)


def slstm_kernel(wx: Tensor, r: Tensor, b: Tensor, *, kernel: Kernel = "auto", **kwargs):
    """`slstm` (same arguments and result) on the implementation `kernel` selects."""
    usable = _triton_device_ok(wx)
    if usable:
        from xlstm_megatron.ops.slstm.triton import MAX_DH, TRITON_AVAILABLE

        usable = TRITON_AVAILABLE and wx.shape[-1] <= MAX_DH
    if not _choose(kernel, usable, "sLSTM", f"needs CUDA tensors of fp32/fp16/bf16, triton and head size <= 128; "
                                            f"got {wx.device}, {wx.dtype}, head size {wx.shape[-1]}"):
        return slstm(wx, r, b, **kwargs)
    from xlstm_megatron.ops.slstm.triton import slstm_triton

    return slstm_triton(wx, r, b, **kwargs)

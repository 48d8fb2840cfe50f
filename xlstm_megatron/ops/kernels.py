"""Choose the implementation of the mLSTM and sLSTM cells: our Triton kernels on CUDA, the torch paths elsewhere.

`kernel="auto"` takes Triton for CUDA tensors of fp32/fp16/bf16 when triton imports (any head size: the sLSTM
kernels stream R in tiles, see ops/slstm/triton/launch.py), else torch. `"triton"` insists (a one-line error where it
cannot run); `"torch"` never uses Triton. The Triton packages are imported only when chosen.
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


def _triton_device_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in _TRITON_DTYPES and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _choose(kernel: str, usable: bool, what: str, why: str) -> bool:
    if kernel not in KERNELS:
        raise ValueError(f"{what} kernel {kernel!r} is unknown; use 'auto', 'torch' or 'triton'")
    if kernel == "triton" and not usable:
        raise ValueError(f"the Triton {what} kernel cannot run here ({why}); use kernel 'auto' or 'torch'")
    return kernel == "triton" or (kernel == "auto" and usable)


def mlstm_implementation(device: torch.device, dtype: torch.dtype, kernel: Kernel = "auto") -> str:
    """"triton" or "torch": what `mlstm_chunkwise_kernel` runs for q on `device` with `dtype`."""
    usable = _triton_device_ok(device, dtype)
    if usable:
        from xlstm_megatron.ops.mlstm.triton import TRITON_AVAILABLE

        usable = TRITON_AVAILABLE
    why = f"needs CUDA tensors of fp32/fp16/bf16 and triton; got {device}, {dtype}"
    return "triton" if _choose(kernel, usable, "mLSTM", why) else "torch"


def slstm_implementation(device: torch.device, dtype: torch.dtype, kernel: Kernel = "auto") -> str:
    """"triton" or "torch": what `slstm_kernel` runs for wx on `device` with `dtype` (at any head size)."""
    usable = _triton_device_ok(device, dtype)
    if usable:
        from xlstm_megatron.ops.slstm.triton import TRITON_AVAILABLE

        usable = TRITON_AVAILABLE
    why = f"needs CUDA tensors of fp32/fp16/bf16 and triton; got {device}, {dtype}"
    return "triton" if _choose(kernel, usable, "sLSTM", why) else "torch"


def mlstm_chunkwise_kernel(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, *, kernel: Kernel = "auto",
                           **kwargs) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """`mlstm_chunkwise` (same arguments and result) on the implementation `kernel` selects."""
    if mlstm_implementation(q.device, q.dtype, kernel) == "torch":
        return mlstm_chunkwise(q, k, v, i, f, **kwargs)
    from xlstm_megatron.ops.mlstm.triton import mlstm_chunkwise_triton

    return mlstm_chunkwise_triton(q, k, v, i, f, **kwargs)


def slstm_kernel(wx: Tensor, r: Tensor, b: Tensor, *, kernel: Kernel = "auto", **kwargs):
    """`slstm` (same arguments and result) on the implementation `kernel` selects."""
    if slstm_implementation(wx.device, wx.dtype, kernel) == "torch":
        return slstm(wx, r, b, **kwargs)
    from xlstm_megatron.ops.slstm.triton import slstm_triton

    return slstm_triton(wx, r, b, **kwargs)

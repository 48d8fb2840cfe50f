"""Choose the chunkwise mLSTM implementation: the Triton kernels on CUDA, the torch path elsewhere.

`kernel="auto"` takes Triton for CUDA tensors of fp32/fp16/bf16 when triton imports, else torch. `"triton"` insists
(a clear error where it cannot run), `"torch"` never uses Triton. The Triton package is imported only when chosen.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from xlstm_megatron.ops.mlstm.chunkwise import mlstm_chunkwise

MLSTMKernel = Literal["auto", "torch", "triton"]
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_usable(q: Tensor) -> bool:
    if q.dtype not in _TRITON_DTYPES or not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    from xlstm_megatron.ops.mlstm.triton import TRITON_AVAILABLE

    return TRITON_AVAILABLE


def mlstm_chunkwise_kernel(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, *, kernel: MLSTMKernel = "auto",
                           **kwargs) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """`mlstm_chunkwise` (same arguments and result) on the implementation `kernel` selects."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"mlstm kernel {kernel!r} is unknown; use 'auto', 'torch' or 'triton'")
    use_triton = kernel == "triton" or (kernel == "auto" and triton_usable(q))
    if not use_triton:
        return mlstm_chunkwise(q, k, v, i, f, **kwargs)
    if not triton_usable(q):
        raise ValueError(
            f"the Triton mLSTM kernel needs CUDA tensors of fp32/fp16/bf16 and triton (got {q.device}, {q.dtype}); "
            "use mlstm_kernel='auto' or 'torch'"
        )
    from xlstm_megatron.ops.mlstm.triton import mlstm_chunkwise_triton

    return mlstm_chunkwise_triton(q, k, v, i, f, **kwargs)

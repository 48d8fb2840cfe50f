"""Kernel dispatch (mLSTM and sLSTM): torch on CPU for "auto", a clear error for an impossible "triton"."""

from __future__ import annotations

import pytest
import torch

from xlstm_megatron.ops.kernels import mlstm_chunkwise_kernel, slstm_kernel
from xlstm_megatron.ops.mlstm import mlstm_chunkwise
from xlstm_megatron.ops.slstm import slstm


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    i, f = (torch.randn(1, 2, 10, generator=g) for _ in range(2))
    return q, k, v, i, f


def test_auto_and_torch_on_cpu_are_the_torch_path():
    args = _inputs()
    ref = mlstm_chunkwise(*args, chunk_size=4)
    for kernel in ("auto", "torch"):
        assert torch.equal(mlstm_chunkwise_kernel(*args, kernel=kernel, chunk_size=4), ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_on_cpu_tensors_names_the_fix():
    with pytest.raises(ValueError, match="use kernel 'auto' or 'torch'"):
        mlstm_chunkwise_kernel(*_inputs(), kernel="triton", chunk_size=4)
    wx, r, b = torch.randn(1, 3, 2, 4, 8), torch.randn(2, 8, 4, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="use kernel 'auto' or 'torch'"):
        slstm_kernel(wx, r, b, kernel="triton")
    assert torch.equal(slstm_kernel(wx, r, b, kernel="auto")[0], slstm(wx, r, b)[0])


def test_unknown_kernel():
    with pytest.raises(ValueError, match="unknown"):
        mlstm_chunkwise_kernel(*_inputs(), kernel="cuda", chunk_size=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_config_refuses_triton_without_gpu():
    from xlstm_megatron.layers.config import make_xlstm_config

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        make_xlstm_config("large", num_layers=1, hidden_size=64, num_attention_heads=2, mlstm_kernel="triton")

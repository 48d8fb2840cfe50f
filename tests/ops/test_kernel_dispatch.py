"""Kernel dispatch (mLSTM and sLSTM): torch on CPU for "auto", a clear error for an impossible "triton", Triton for
CUDA tensors at every sLSTM head size the paper models use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from xlstm_megatron.ops.kernels import mlstm_chunkwise_kernel, slstm_implementation, slstm_kernel
from xlstm_megatron.ops.mlstm import mlstm_chunkwise
from xlstm_megatron.ops.slstm import slstm

REPO = Path(__file__).resolve().parents[2]
V1_71_CONFIGS = sorted((REPO / "configs" / "v1").glob("xlstm71_*.yaml"))


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


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("config", V1_71_CONFIGS, ids=lambda p: p.stem)
def test_v1_paper_models_take_the_fused_slstm_path_on_cuda(config):
    """Every xLSTM[7:1] config's sLSTM layers (4 heads of 192 ... 640) get the fused Triton kernel for CUDA tensors
    in their training dtypes; the launcher accepts their sizes (any grid it launches is checked to fit before)."""
    from xlstm_megatron.ops.slstm.triton import launch

    model = yaml.safe_load(config.read_text())["model"]
    dh = model["hidden_size"] // model["slstm_num_heads"]
    assert dh >= 192
    for dtype in (torch.bfloat16, torch.float32):
        assert slstm_implementation(torch.device("cuda"), dtype, "auto") == "triton"
        assert slstm_implementation(torch.device("cuda"), dtype, "triton") == "triton"
    assert slstm_implementation(torch.device("cpu"), torch.bfloat16, "auto") == "torch"
    launch.check_sizes(16, 2048, model["slstm_num_heads"], dh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_runs_triton_at_every_slstm_head_size(monkeypatch):
    import xlstm_megatron.ops.mlstm.triton as mlstm_triton
    import xlstm_megatron.ops.slstm.triton as slstm_triton

    calls: list[str] = []
    for mod, name in ((mlstm_triton, "mlstm_chunkwise_triton"), (slstm_triton, "slstm_triton")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _name=name, **k: (calls.append(_name), _fn(*a, **k))[1])

    args = [t.cuda() for t in _inputs()]
    torch.testing.assert_close(mlstm_chunkwise_kernel(*args, kernel="auto", chunk_size=4),
                               mlstm_chunkwise(*args, chunk_size=4), atol=1e-4, rtol=1e-4)
    assert calls == ["mlstm_chunkwise_triton"]
    for dh in (64, 192, 640):
        wx, r, b = torch.randn(1, 3, 2, 4, dh), torch.randn(2, dh, 4, dh) * dh**-0.5, torch.randn(2, 4, dh)
        wx, r, b = wx.cuda(), r.cuda(), b.cuda()
        calls.clear()
        torch.testing.assert_close(slstm_kernel(wx, r, b, kernel="auto")[0], slstm(wx, r, b)[0], atol=1e-4, rtol=1e-4)
        assert calls == ["slstm_triton"]

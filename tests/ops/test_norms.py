"""rms_norm / layer_norm / head_norm against the official v1 (xlstm.components.ln) and xlstm_large norms."""

import pytest
import torch
from xlstm.components.ln import LayerNorm as V1LayerNorm
from xlstm.components.ln import MultiHeadLayerNorm as V1MultiHeadLayerNorm
from xlstm.xlstm_large.components import LayerNorm as LargeLayerNorm
from xlstm.xlstm_large.components import MultiHeadLayerNorm as LargeMultiHeadLayerNorm
from xlstm.xlstm_large.components import RMSNorm as LargeRMSNorm

from xlstm_megatron.ops.norms import head_norm, layer_norm, rms_norm

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0, shift=0.0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * scale + shift


def _randomize(module: torch.nn.Module, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    module = module.to(dtype)
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(_rand(*p.shape, dtype=dtype, seed=seed + i))
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("use_weight", "eps"), [(True, 1e-6), (False, 1e-6), (True, 1e-3)])
def test_rms_norm_matches_large(dtype, use_weight, eps):
    d = 24
    # fp64 must not be squashed to fp32 by the oracle, so it runs the oracle without forced fp32 reductions.
    mod = LargeRMSNorm(d, eps=eps, use_weight=use_weight, force_float32_reductions=dtype == torch.float32)
    mod = _randomize(mod, dtype, seed=1)
    x = _rand(5, 2, d, dtype=dtype, seed=2, scale=3.0, shift=0.5)  # (S, B, D): any leading layout
    with torch.no_grad():
        ref = mod(x)
    torch.testing.assert_close(rms_norm(x, mod.weight, eps), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("residual_weight", "with_bias", "eps"), [(True, False, 1e-5), (False, True, 1e-5),
                                                                    (True, True, 1e-3)])
def test_layer_norm_matches_v1(dtype, residual_weight, with_bias, eps):
    d = 20
    mod = _randomize(V1LayerNorm(d, bias=with_bias, eps=eps, residual_weight=residual_weight), dtype, seed=3)
    x = _rand(3, 4, d, dtype=dtype, seed=4, scale=2.0, shift=-1.0)
    with torch.no_grad():
        ref = mod(x)
    out = layer_norm(x, mod.weight, mod.bias, eps=eps, weight_offset=1.0 if residual_weight else 0.0)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_large(dtype):
    d = 16
    mod = LargeLayerNorm(d, eps=1e-6, use_bias=True, force_float32_reductions=dtype == torch.float32)
    mod = _randomize(mod, dtype, seed=5)
    x = _rand(2, 7, d, dtype=dtype, seed=6, scale=4.0)
    with torch.no_grad():
        ref = mod(x)
    torch.testing.assert_close(layer_norm(x, mod.weight, mod.bias, eps=1e-6), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("nh", "dh", "with_bias"), [(4, 8, False), (2, 5, True), (1, 6, False)])
def test_head_norm_matches_v1_group_norm(dtype, nh, dh, with_bias):
    mod = _randomize(V1MultiHeadLayerNorm(nh * dh, bias=with_bias, eps=1e-5, residual_weight=True), dtype, seed=7)
    x = _rand(2, nh, 5, dh, dtype=dtype, seed=8, scale=2.0, shift=0.3)  # v1 layout (B, NH, S, DH)
    with torch.no_grad():
        ref = mod(x)
    out = head_norm(x.transpose(1, 2), mod.weight, mod.bias, eps=1e-5, weight_offset=1.0).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("nh", "dh", "use_weight"), [(4, 8, True), (3, 4, False)])
def test_head_norm_matches_large(dtype, nh, dh, use_weight):
    mod = LargeMultiHeadLayerNorm(nh, dh, eps=1e-6, use_weight=use_weight,
                                  force_float32_reductions=dtype == torch.float32)
    mod = _randomize(mod, dtype, seed=9)
    x = _rand(2, 6, nh, dh, dtype=dtype, seed=10, scale=3.0)  # (B, S, NH, DH)
    with torch.no_grad():
        ref = mod(x)  # (B, S, NH*DH)
    out = head_norm(x, mod.weight, eps=1e-6).flatten(-2)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_gradcheck():
    kw = dict(dtype=torch.float64, requires_grad=True)
    x = _rand(2, 3, 4, dtype=torch.float64, seed=11).requires_grad_()
    w, b = _rand(3 * 4, seed=12, dtype=torch.float64).requires_grad_(), torch.randn(3 * 4, **kw)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w[:4], eps=1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, w[:4], b[:4], weight_offset=1.0), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: head_norm(x, w, b, eps=1e-5, weight_offset=1.0), (x, w, b))


@pytest.mark.parametrize("fn", ["rms", "ln", "head"])
def test_bf16_close_to_fp32(fn):
    nh, dh = 4, 16
    x = _rand(3, 5, nh, dh, seed=13, scale=5.0, shift=2.0)
    w, b = _rand(nh * dh, seed=14) * 0.1, _rand(nh * dh, seed=15)
    ops = {
        "rms": lambda x, w, b: rms_norm(x.flatten(-2), w),
        "ln": lambda x, w, b: layer_norm(x.flatten(-2), w, b, weight_offset=1.0),
        "head": lambda x, w, b: head_norm(x, w, b, weight_offset=1.0),
    }
    ref = ops[fn](x, w, b)
    for wb, bb in ((w.bfloat16(), b.bfloat16()), (w, b)):  # bf16 params and fp32 master params
        out = ops[fn](x.bfloat16(), wb, bb)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=0.02)

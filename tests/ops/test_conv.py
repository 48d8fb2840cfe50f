"""causal_conv1d / causal_conv1d_step: equality to the official CausalConv1d and self-consistency of the state."""

import pytest
import torch
from xlstm.components.conv import CausalConv1d, CausalConv1dConfig

from xlstm_megatron.ops.conv import causal_conv1d, causal_conv1d_step

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _params(channels: int, k: int, with_bias: bool, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, k, generator=g, dtype=dtype)
    bias = torch.randn(channels, generator=g, dtype=dtype) if with_bias else None
    return weight, bias


def _official(weight: torch.Tensor, bias: torch.Tensor | None) -> CausalConv1d:
    channels, k = weight.shape
    mod = CausalConv1d(CausalConv1dConfig(feature_dim=channels, kernel_size=k, causal_conv_bias=bias is not None))
    mod = mod.to(weight.dtype)
    with torch.no_grad():
        mod.conv.weight.copy_(weight.unsqueeze(1))
        if bias is not None:
            mod.conv.bias.copy_(bias)
    return mod


# The official module is broken for K=1 (it slices y[..., :-0]), so oracle comparisons use K >= 2.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "seq", "channels", "k", "with_bias"), [(2, 9, 8, 4, True), (1, 2, 5, 4, False),
                                                                           (3, 7, 6, 2, True), (2, 16, 4, 5, True)])
def test_matches_official_forward(dtype, batch, seq, channels, k, with_bias):
    weight, bias = _params(channels, k, with_bias, dtype, seed=seq * 31 + k)
    x = torch.randn(batch, seq, channels, dtype=dtype, generator=torch.Generator().manual_seed(k))
    state = torch.randn(batch, k - 1, channels, dtype=dtype, generator=torch.Generator().manual_seed(k + 1))
    mod = _official(weight, bias)
    with torch.no_grad():
        ref = mod(x)
        ref_y, ref_state = mod(x, conv_state=state, return_last_state=True)
    torch.testing.assert_close(causal_conv1d(x, weight, bias), ref, atol=TOL[dtype], rtol=0)
    y, new_state = causal_conv1d(x, weight, bias, state=state, return_state=True)
    torch.testing.assert_close(y, ref_y, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(new_state, ref_state, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "with_bias"), [(4, True), (3, False), (2, True)])
def test_step_matches_official_step(dtype, k, with_bias):
    batch, seq, channels = 2, 6, 5
    weight, bias = _params(channels, k, with_bias, dtype, seed=k)
    x = torch.randn(batch, seq, channels, dtype=dtype, generator=torch.Generator().manual_seed(7))
    mod = _official(weight, bias)
    ref_state, state = None, torch.zeros(batch, k - 1, channels, dtype=dtype)
    with torch.no_grad():
        for t in range(seq):
            ref_y, ref_state = mod.step(x[:, t : t + 1], ref_state)  # official state: last K inputs incl. current
            y, state = causal_conv1d_step(x[:, t], weight, bias, state)
            torch.testing.assert_close(y, ref_y[:, 0], atol=TOL[dtype], rtol=0)
            torch.testing.assert_close(state, ref_state[0][:, 1:], atol=0, rtol=0)


@pytest.mark.parametrize(("seq", "k", "with_bias"), [(7, 4, True), (3, 4, False), (5, 1, True), (4, 6, True)])
def test_full_sequence_equals_token_steps(seq, k, with_bias):
    batch, channels = 2, 6
    weight, bias = _params(channels, k, with_bias, torch.float64, seed=seq + k)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(batch, seq, channels, dtype=torch.float64, generator=g)
    state0 = torch.randn(batch, k - 1, channels, dtype=torch.float64, generator=g)
    y_full, state_full = causal_conv1d(x, weight, bias, state=state0, return_state=True)
    state, ys = state0, []
    for t in range(seq):
        y, state = causal_conv1d_step(x[:, t], weight, bias, state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_full, atol=1e-13, rtol=0)
    torch.testing.assert_close(state, state_full, atol=0, rtol=0)


@pytest.mark.parametrize(("splits", "k"), [((4, 1, 6), 4), ((1, 1, 1, 8), 4), ((2, 9), 5), ((3, 3, 5), 1)])
def test_split_sequence_with_carried_state_equals_one_pass(splits, k):
    channels = 4
    weight, bias = _params(channels, k, True, torch.float64, seed=sum(splits))
    x = torch.randn(3, sum(splits), channels, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    y_ref, state_ref = causal_conv1d(x, weight, bias, return_state=True)
    state, ys = None, []
    for chunk in torch.split(x, list(splits), dim=1):
        y, state = causal_conv1d(chunk, weight, bias, state=state, return_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=1), y_ref, atol=1e-13, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=0, rtol=0)


def test_short_sequence_state_keeps_old_rows():
    k, channels = 4, 3
    weight, bias = _params(channels, k, True, torch.float32, seed=0)
    state = torch.randn(2, k - 1, channels)
    x = torch.randn(2, 1, channels)
    _, new_state = causal_conv1d(x, weight, bias, state=state, return_state=True)
    torch.testing.assert_close(new_state, torch.cat([state[:, 1:], x], dim=1), atol=0, rtol=0)
    _, zero_start = causal_conv1d(x, weight, bias, return_state=True)
    torch.testing.assert_close(zero_start, torch.cat([torch.zeros(2, 2, channels), x], dim=1), atol=0, rtol=0)


def test_leading_dims_and_sequence_first_view():
    k, channels = 4, 5
    weight, bias = _params(channels, k, True, torch.float32, seed=1)
    x = torch.randn(2, 3, 7, channels)
    state = torch.randn(2, 3, k - 1, channels)
    y, s = causal_conv1d(x, weight, bias, state=state, return_state=True)
    y_flat, s_flat = causal_conv1d(x.flatten(0, 1), weight, bias, state=state.flatten(0, 1), return_state=True)
    torch.testing.assert_close(y, y_flat.view_as(y), atol=0, rtol=0)
    torch.testing.assert_close(s, s_flat.view_as(s), atol=0, rtol=0)
    x_sbc = torch.randn(7, 2, channels)  # Megatron layout, passed as a (non-contiguous) batch-first view
    torch.testing.assert_close(causal_conv1d(x_sbc.transpose(0, 1), weight, bias),
                               causal_conv1d(x_sbc.transpose(0, 1).contiguous(), weight, bias), atol=0, rtol=0)
    y_step, _ = causal_conv1d_step(x[:, :, 0], weight, bias, state)
    torch.testing.assert_close(y_step, y[:, :, 0], atol=1e-6, rtol=0)


def test_bad_shapes_raise():
    weight, bias = _params(4, 3, True, torch.float32, seed=0)
    with pytest.raises(ValueError):
        causal_conv1d(torch.randn(2, 5, 4), weight, bias, state=torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        causal_conv1d(torch.randn(2, 5, 3), weight, bias)


@pytest.mark.parametrize("k", [4, 1])
def test_gradcheck(k):
    g = torch.Generator().manual_seed(k)
    kw = dict(dtype=torch.float64, generator=g, requires_grad=True)
    x, state = torch.randn(2, 3, 3, **kw), torch.randn(2, k - 1, 3, **kw)
    weight, bias = torch.randn(3, k, **kw), torch.randn(3, **kw)

    def full(x, weight, bias, state):
        y, s = causal_conv1d(x, weight, bias, state=state, return_state=True)
        return y, s

    assert torch.autograd.gradcheck(full, (x, weight, bias, state))
    assert torch.autograd.gradcheck(causal_conv1d_step, (x[:, 0], weight, bias, state))


def test_bf16_close_to_fp32():
    k, channels = 4, 16
    weight, bias = _params(channels, k, True, torch.float32, seed=3)
    g = torch.Generator().manual_seed(5)
    x, state = torch.randn(2, 12, channels, generator=g), torch.randn(2, k - 1, channels, generator=g)
    ref = causal_conv1d(x, weight, bias, state=state)
    xb, wb, bb, sb = (t.bfloat16() for t in (x, weight, bias, state))
    y = causal_conv1d(xb, wb, bb, state=sb)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)
    y_mixed = causal_conv1d(xb, weight, bias, state=sb)  # fp32 master weights with bf16 activations
    assert y_mixed.dtype == torch.bfloat16
    torch.testing.assert_close(y_mixed.float(), ref, atol=0.1, rtol=0.02)
    y_step, _ = causal_conv1d_step(xb[:, 0], wb, bb, sb)
    assert y_step.dtype == torch.bfloat16 and torch.isfinite(y_step).all()
    torch.testing.assert_close(y_step.float(), ref[:, 0], atol=0.1, rtol=0.02)

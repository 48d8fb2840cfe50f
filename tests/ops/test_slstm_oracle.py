"""sLSTM vs the official xlstm 2.0.6 sLSTM, backend "vanilla", at cell and layer level, with random weights.

Official layout (xlstm/blocks/slstm/cell.py, sLSTMCell_vanilla, and src/vanilla/):
- cell input x: (B, S, 4 * NH * DH) ordered (gate, head, dh) ("BSGNH"), gates (i, f, z, o) (the pointwise function
  unbinds iraw, fraw, zraw, oraw in this order);
- internal recurrent kernel ``_recurrent_kernel_``: (NH, 4 * DH_out, DH_in), recurrent term
  Ry[b, g, h, e] = sum_d y[b, h, d] * R[h, g * DH + e, d];
- internal bias ``_bias_``: (4 * NH * DH) ordered (gate, head, dh);
- output: (B, NH, S, DH) ("BNSH"); state: (4, B, NH * DH) holding (y, c, n, m).
Layer trap (xlstm/blocks/slstm/layer.py): the module named ``fgate`` feeds the input-gate slot and ``igate`` feeds the
forget-gate slot of the cell input.
"""

import pytest
import torch
from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig
from xlstm.blocks.slstm.layer import sLSTMLayer, sLSTMLayerConfig

from xlstm_megatron.ops.slstm import slstm, slstm_reference


def wx_from_official_input(x: torch.Tensor, nh: int, dh: int) -> torch.Tensor:
    """(B, S, 4 NH DH) in (gate, head, dh) order -> our (B, S, NH, 4, DH)."""
    return x.unflatten(-1, (4, nh, dh)).transpose(2, 3)


def r_from_official(r_int: torch.Tensor, nh: int, dh: int) -> torch.Tensor:
    """Vanilla internal (NH, 4 DH_out, DH_in) -> our (NH, DH_in, 4, DH_out): r[h, d, g, e] = R[h, g DH + e, d]."""
    return r_int.view(nh, 4, dh, dh).permute(0, 3, 1, 2)


def b_from_official(b_int: torch.Tensor, nh: int, dh: int) -> torch.Tensor:
    """Vanilla internal (4 NH DH) in (gate, head, dh) order -> our (NH, 4, DH)."""
    return b_int.view(4, nh, dh).transpose(0, 1)


def official_cell(nh: int, dh: int, dtype: torch.dtype, seed: int) -> sLSTMCell:
    cell = sLSTMCell(sLSTMCellConfig(hidden_size=nh * dh, num_heads=nh, backend="vanilla", dtype="float32"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cell._recurrent_kernel_.copy_(torch.randn(cell._recurrent_kernel_.shape, generator=g) / dh**0.5)
        cell._bias_.copy_(torch.randn(cell._bias_.shape, generator=g))
    return cell.to(dtype)


def random_state(bsz: int, nh: int, dh: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A valid official state (4, B, NH DH): n > 0, |c| <= n."""
    g = torch.Generator().manual_seed(seed)
    shape = (bsz, nh * dh)
    n = torch.rand(shape, generator=g) * 2 + 0.5
    c = (torch.rand(shape, generator=g) * 2 - 1) * n
    y = torch.rand(shape, generator=g) * 2 - 1
    m = torch.randn(shape, generator=g)
    return torch.stack([y, c, n, m]).to(dtype)


def test_mapping_matches_the_official_external_layout():
    """Our (r, b) layout is the official cell's backend-agnostic external layout (its ParameterProxy views)."""
    cell = official_cell(2, 4, torch.float32, seed=0)
    torch.testing.assert_close(cell.recurrent_kernel[:], r_from_official(cell._recurrent_kernel_, 2, 4), atol=0, rtol=0)
    torch.testing.assert_close(cell.bias[:], b_from_official(cell._bias_, 2, 4), atol=0, rtol=0)


@pytest.mark.parametrize(("bsz", "seq", "nh", "dh"), [(2, 7, 2, 4), (3, 16, 4, 8)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", [slstm, slstm_reference])
def test_matches_official_cell(bsz, seq, nh, dh, with_state, dtype, impl):
    cell = official_cell(nh, dh, dtype, seed=bsz + seq)
    g = torch.Generator().manual_seed(seq)
    x = (torch.randn(bsz, seq, 4 * nh * dh, generator=g) * 2).to(dtype).requires_grad_()
    state = random_state(bsz, nh, dh, dtype, seed=seq).requires_grad_() if with_state else None
    g_y = torch.randn(bsz, nh, seq, dh, generator=g).to(dtype)
    g_state = torch.randn(4, bsz, nh * dh, generator=g).to(dtype)

    y_off, state_off = cell(x, state)
    torch.autograd.backward([y_off, state_off], [g_y, g_state])

    x2 = x.detach().clone().requires_grad_()
    r_int = cell._recurrent_kernel_.detach().clone().requires_grad_()
    b_int = cell._bias_.detach().clone().requires_grad_()
    state2 = state.detach().clone().requires_grad_() if with_state else None
    ours_state = tuple(s.view(bsz, nh, dh) for s in state2.unbind(0)) if with_state else None
    y, final = impl(wx_from_official_input(x2, nh, dh), r_from_official(r_int, nh, dh), b_from_official(b_int, nh, dh),
                    initial_state=ours_state)
    final = torch.stack([s.reshape(bsz, nh * dh) for s in final])
    torch.autograd.backward([y, final], [g_y.transpose(1, 2), g_state])

    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-11, rtol=1e-11)}[dtype]
    torch.testing.assert_close(y, y_off.transpose(1, 2), **tol)
    torch.testing.assert_close(final, state_off, **tol)
    grad_tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}[dtype]
    torch.testing.assert_close(x2.grad, x.grad, **grad_tol)
    torch.testing.assert_close(r_int.grad, cell._recurrent_kernel_.grad, **grad_tol)
    torch.testing.assert_close(b_int.grad, cell._bias_.grad, **grad_tol)
    if with_state:
        torch.testing.assert_close(state2.grad, state.grad, **grad_tol)


def _layer_forward_with_ours(layer: sLSTMLayer, x: torch.Tensor, swap_trap: bool) -> torch.Tensor:
    """The official layer's forward with its cell replaced by ours; the gate projections are mapped explicitly."""
    bsz, seq, emb = x.shape
    nh = layer.config.num_heads
    dh = emb // nh
    x_conv = layer.conv_act_fn(layer.conv1d(x))
    i_proj, f_proj = (layer.igate, layer.fgate) if swap_trap else (layer.fgate, layer.igate)
    gates = [i_proj(x_conv), f_proj(x_conv), layer.zgate(x), layer.ogate(x)]  # (i, f, z, o), each (B, S, NH DH)
    wx = torch.stack(gates, dim=2).unflatten(-1, (nh, dh)).transpose(2, 3)  # (B, S, NH, 4, DH)
    cell = layer.slstm_cell
    y, _ = slstm(wx, r_from_official(cell._recurrent_kernel_, nh, dh), b_from_official(cell._bias_, nh, dh))
    return layer.group_norm(y.transpose(1, 2)).transpose(1, 2).reshape(bsz, seq, emb)


def test_matches_official_layer_with_gate_module_trap():
    torch.manual_seed(0)
    nh, dh, bsz, seq = 2, 8, 2, 12
    layer = sLSTMLayer(sLSTMLayerConfig(embedding_dim=nh * dh, num_heads=nh, backend="vanilla", dtype="float32",
                                        conv1d_kernel_size=4, dropout=0.0))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    x = torch.randn(bsz, seq, nh * dh, requires_grad=True)
    out_off = layer(x)
    (gx_off,) = torch.autograd.grad(out_off.square().sum(), x)

    out = _layer_forward_with_ours(layer, x, swap_trap=False)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, out_off, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_off, atol=1e-4, rtol=1e-4)
    # Feeding `igate` to the input-gate slot (the names' face value) does not reproduce the official layer.
    assert (_layer_forward_with_ours(layer, x, swap_trap=True) - out_off).abs().max() > 1e-2

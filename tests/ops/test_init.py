"""Initialisations against the official xlstm code (std formulas captured from the official calls, gate biases)."""

import pytest
import torch
from xlstm.blocks.mlstm.cell import mLSTMCell, mLSTMCellConfig
from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig
from xlstm.components import init as official_init

from xlstm_megatron.ops.init import (
    mlstm_forget_gate_bias,
    normal_init_method,
    slstm_forget_gate_bias,
    small_init_std,
    wang_init_std,
)


def _official_std(monkeypatch, fn, *args) -> float:
    """Run an official init function and capture the std it passes to torch.nn.init.normal_."""
    seen = []
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, mean=0.0, std=1.0: seen.append((mean, std)) or t)
    fn(torch.empty(3), *args)
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0][0] == 0.0
    return seen[0][1]


@pytest.mark.parametrize("dim", [1, 64, 768, 4096])
def test_small_init_std_matches_official(monkeypatch, dim):
    assert small_init_std(dim) == _official_std(monkeypatch, official_init.small_init_init_, dim)


@pytest.mark.parametrize(("dim", "num_blocks"), [(1, 1), (768, 24), (4096, 32), (1536, 48)])
def test_wang_init_std_matches_official(monkeypatch, dim, num_blocks):
    assert wang_init_std(dim, num_blocks) == _official_std(monkeypatch, official_init.wang_init_, dim, num_blocks)


def test_normal_init_method_fills_in_place_like_official_small_init():
    dim = 256
    ours, ref = torch.empty(400, 300), torch.empty(400, 300)
    torch.manual_seed(0)
    assert normal_init_method(small_init_std(dim))(ours) is None
    torch.manual_seed(0)
    official_init.small_init_init_(ref, dim)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    assert abs(ours.std().item() / small_init_std(dim) - 1) < 0.01 and abs(ours.mean().item()) < 1e-3


@pytest.mark.parametrize("num_heads", [1, 4, 8])
def test_mlstm_forget_gate_bias_matches_v1_cell(num_heads):
    cell = mLSTMCell(mLSTMCellConfig(context_length=4, embedding_dim=8 * num_heads, num_heads=num_heads))
    cell.reset_parameters()
    torch.testing.assert_close(mlstm_forget_gate_bias(num_heads), cell.fgate.bias.detach(), atol=0, rtol=0)


@pytest.mark.parametrize(("head_dim", "block_idx", "num_blocks"), [(8, 0, 1), (16, 0, 4), (16, 3, 4), (32, 5, 12),
                                                                   (2, 1, 2)])
def test_slstm_forget_gate_bias_matches_v1_cell(head_dim, block_idx, num_blocks):
    num_heads = 2
    cell = sLSTMCell(sLSTMCellConfig(hidden_size=num_heads * head_dim, num_heads=num_heads, backend="vanilla",
                                     _block_idx=block_idx, _num_blocks=num_blocks))
    cell.reset_parameters()
    bias = cell.bias[:]  # external layout (NH, 4 gates i/f/z/o, DH)
    assert bias.shape == (num_heads, 4, head_dim)
    ours = slstm_forget_gate_bias(head_dim, block_idx, num_blocks)
    for h in range(num_heads):
        torch.testing.assert_close(ours, bias[h, 1], atol=1e-6, rtol=0)
    assert ours[0].item() == 5.0 and ours[-1].item() == pytest.approx(-7.0)
    assert (ours[1:] < ours[:-1]).all()


def test_slstm_forget_gate_bias_edge_cases():
    assert torch.equal(slstm_forget_gate_bias(1, 0, 3), torch.tensor([5.0]))
    with pytest.raises(ValueError):
        slstm_forget_gate_bias(8, 2, 2)

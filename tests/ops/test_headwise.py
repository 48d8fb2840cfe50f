"""headwise_linear against the plain per-block definition y_b = W_b x_b, values and gradients."""

import pytest
import torch

from xlstm_megatron.ops.headwise import headwise_linear


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    nb, _, bs_in = weight.shape
    blocks = x.unflatten(-1, (nb, bs_in))
    return torch.cat([blocks[..., b, :] @ weight[b].T for b in range(nb)], dim=-1)


@pytest.mark.parametrize("lead,nb,bs_out,bs_in", [((7, 3), 5, 4, 4), ((2, 6), 3, 8, 2), ((11,), 1, 3, 5)])
def test_headwise_linear_matches_blocks(lead: tuple, nb: int, bs_out: int, bs_in: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, nb * bs_in, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(nb, bs_out, bs_in, generator=g, dtype=torch.float64, requires_grad=True)
    y = headwise_linear(x, w)
    ref = _reference(x, w)
    assert y.shape == (*lead, nb * bs_out)
    torch.testing.assert_close(y, ref)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(ref, (x, w), dy))


def test_headwise_linear_refuses_a_width_mismatch() -> None:
    with pytest.raises(ValueError, match="input width 6 != 2 blocks x 4"):
        headwise_linear(torch.zeros(3, 6), torch.zeros(2, 4, 4))

"""soft_cap against xlstm_large's soft_cap."""

import pytest
import torch
from xlstm.xlstm_large.components import soft_cap as large_soft_cap

from xlstm_megatron.ops.softcap import soft_cap


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cap", [15.0, 30.0, 0.5])
def test_matches_large(dtype, cap):
    x = torch.randn(4, 33, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 40
    out = soft_cap(x, cap)
    torch.testing.assert_close(out, large_soft_cap(x, cap), atol=0, rtol=0)
    assert (out.abs() <= cap).all()


def test_none_and_zero_are_identity():
    x = torch.randn(3, 5)
    assert soft_cap(x, None) is x
    assert soft_cap(x, 0.0) is x


def test_bf16_close_to_fp32():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 50
    out = soft_cap(x.bfloat16(), 30.0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), soft_cap(x, 30.0), atol=0.2, rtol=0.02)


def test_gradcheck():
    x = (torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 20).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: soft_cap(x, 15.0), (x,))

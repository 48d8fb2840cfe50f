"""Token choice: greedy, temperature, top-k and top-p keep exactly the tokens they should."""

from __future__ import annotations

import pytest
import torch

from xlstm_megatron.inference.sampling import check_sampling_args, next_tokens

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)


def _draws(n: int, **kwargs) -> torch.Tensor:
    logits = PROBS.log().expand(n, -1)
    return next_tokens(logits, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("kwargs,allowed", [
    (dict(temperature=1.0, top_k=0, top_p=1.0), {0, 1, 2, 3}),
    (dict(temperature=1.0, top_k=2, top_p=1.0), {1, 3}),
    (dict(temperature=1.0, top_k=0, top_p=0.7), {1, 3}),  # 0.5 < 0.7 <= 0.5 + 0.3
    (dict(temperature=1.0, top_k=0, top_p=0.5), {1}),
    (dict(temperature=1.0, top_k=3, top_p=0.9), {1, 3, 2}),
    (dict(temperature=0.5, top_k=1, top_p=1.0), {1}),
])
def test_filters_keep_the_right_tokens_with_renormalised_probabilities(kwargs, allowed):
    draws = _draws(20000, **kwargs)
    assert set(draws.tolist()) == allowed
    temp = kwargs["temperature"]
    expected = PROBS ** (1 / temp) * torch.tensor([i in allowed for i in range(4)])
    expected /= expected.sum()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_greedy_is_argmax_and_seeds_reproduce():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(next_tokens(logits, temperature=0, top_k=0, top_p=1.0, generator=None), logits.argmax(-1))
    a, b = (next_tokens(logits, temperature=1.0, top_k=0, top_p=1.0, generator=torch.Generator().manual_seed(7))
            for _ in range(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_args_are_refused(bad):
    args = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **bad}
    with pytest.raises(ValueError):
        check_sampling_args(**args)

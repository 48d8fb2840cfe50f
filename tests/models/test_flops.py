"""The model-FLOP formula against torch's FLOP counter on a real forward pass."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import run_distributed
from tests.models.helpers import build_model, tiny_config

S, V = 64, 256


def _counted_and_predicted(block: str, cfg: dict):
    from torch.utils.flop_counter import FlopCounterMode

    from xlstm_megatron.models.flops import forward_flops_per_token

    config = tiny_config(block, **cfg)
    model = build_model(config, V, S)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, V, (2, S)), None, None)
    return counter.get_total_flops() / (2 * S), forward_flops_per_token(config, V, S)


def test_large_flops_equal_counted_matmuls():
    cfg = dict(num_layers=2, hidden_size=64, num_attention_heads=4, mlstm_chunk_size=16)
    counted, predicted = run_distributed(_counted_and_predicted, world_size=1, args=("large", cfg))[0]
    assert counted == predicted


@pytest.mark.parametrize("pattern", ["ms", "mmss"])
def test_v1_flops_close_to_counted(pattern):
    # The v1 cell's block-diagonal and gate einsums partly run as element-wise products, which the counter skips.
    cfg = dict(num_layers=len(pattern), hidden_size=64, num_attention_heads=4, xlstm_pattern=pattern,
               slstm_num_heads=4, mlstm_chunk_size=16)
    counted, predicted = run_distributed(_counted_and_predicted, world_size=1, args=("v1", cfg))[0]
    assert 0.9 * predicted <= counted <= predicted

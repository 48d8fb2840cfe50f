"""Bad xLSTM configs fail at construction with one line that names the fix."""

from __future__ import annotations

import pytest
import torch

from xlstm_megatron.layers.config import make_xlstm_config, pattern_from_positions

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=4)

BAD = [
    (dict(num_attention_heads=3, tensor_model_parallel_size=2), "divisible by tensor_model_parallel_size|multiple"),
    (dict(xlstm_block="v1", xlstm_pattern="msmm", slstm_num_heads=3, tensor_model_parallel_size=2), "slstm_num_heads"),
    (dict(xlstm_pattern="mmm"), "3 symbols but num_layers=4"),
    (dict(xlstm_pattern="mmxm"), "unknown symbols"),
    (dict(xlstm_pattern="msmm"), "only in the v1 family"),
    (dict(num_layers=3, xlstm_pattern="mmm", pipeline_model_parallel_size=2, pipeline_dtype=torch.float32),
     "cannot be split evenly"),
    (dict(mlstm_qk_dim_factor=0.3), "mlstm_qk_dim_factor"),
    (dict(mlstm_qk_dim=30), "mlstm_qk width 30"),
    (dict(xlstm_block="v1", num_attention_heads=32, hidden_size=32), "mlstm_qkv_block_size"),
    (dict(mlstm_backward="approx"), "mlstm_backward"),
    (dict(hidden_sise=64), "unknown XLSTMConfig fields"),
]


@pytest.mark.parametrize("overrides,match", BAD)
def test_bad_config_one_clear_line(overrides, match):
    kwargs = {**BASE, **overrides}
    block = kwargs.pop("xlstm_block", "large")
    with pytest.raises(ValueError, match=match) as info:
        make_xlstm_config(block, **kwargs)
    assert "\n" not in str(info.value)


def test_pattern_from_positions_paper_layout():
    pattern = pattern_from_positions(48, [3, 5, 7, 40, 42, 44])
    assert len(pattern) == 48 and [i for i, c in enumerate(pattern) if c == "s"] == [3, 5, 7, 40, 42, 44]
    with pytest.raises(ValueError, match="outside"):
        pattern_from_positions(4, [4])


def test_good_configs_take_family_defaults():
    large = make_xlstm_config("large", **BASE)
    v1 = make_xlstm_config("v1", **BASE, xlstm_pattern="mmsm")
    assert (large.gate_soft_cap, large.output_logit_soft_cap, large.mlstm_backward) == (15.0, 30.0, "constant")
    assert (v1.gate_soft_cap, v1.output_logit_soft_cap, v1.mlstm_backward) == (0.0, 0.0, "exact")
    assert large.ffn_hidden_size == 192 and v1.ffn_hidden_size == 128  # official rounding of 2.6667 E and 1.3 E

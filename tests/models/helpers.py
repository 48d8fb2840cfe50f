"""Builders shared by the model tests (they run inside `run_distributed` workers)."""

from __future__ import annotations

from typing import Any

import torch

from xlstm_megatron.compat import cpu_config_overrides
from xlstm_megatron.layers.config import XLSTMConfig, make_xlstm_config
from xlstm_megatron.models.xlstm_model import XLSTMModel


def tiny_config(block: str = "large", **kwargs: Any) -> XLSTMConfig:
    from megatron.core import parallel_state as ps

    base = dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        params_dtype=torch.float32,
        **cpu_config_overrides(),
    )
    return make_xlstm_config(block, **{**base, **kwargs})


def build_model(config: XLSTMConfig, vocab_size: int, seq_length: int, **kwargs: Any) -> XLSTMModel:
    from megatron.core import parallel_state as ps

    return XLSTMModel(
        config,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        **kwargs,
    )

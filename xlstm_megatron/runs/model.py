"""Megatron arguments -> XLSTMConfig -> XLSTMModel: the one place a run's model is built.

The training engine's model builder, the converters, generation and the benchmarks all build through here, from
parsed-and-validated Megatron arguments (a live run's, or the `args` a Megatron checkpoint saved).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.runs.errors import ConfigError


def xlstm_config_from_args(args: Namespace, **overrides: Any) -> XLSTMConfig:
    """Megatron's own `core_transformer_config_from_args` with `config_class=XLSTMConfig`; on CPU the flags Megatron
    needs there (`cpu_config_overrides`) replace the saved GPU ones. Config checks become one-line ConfigErrors."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from xlstm_megatron.compat import cpu_config_overrides

    if not torch.cuda.is_available():
        overrides = {**cpu_config_overrides(), **overrides}
    try:
        config = core_transformer_config_from_args(args, config_class=XLSTMConfig)
        for name, value in overrides.items():
            setattr(config, name, value)
        return config
    except (ValueError, AssertionError) as e:  # Megatron's own config checks are assertions
        raise ConfigError(f"bad model config: {e}".splitlines()[0]) from None


def model_config_from_args(args: Namespace, config: XLSTMConfig | None = None) -> Any:
    """The `XLSTMModelConfig` (a megatron.training GPTModelConfig whose builder makes an XLSTMModel) that Megatron's
    `pretrain()` builds its model chunks from."""
    from megatron.training.argument_utils import gpt_config_from_args

    from xlstm_megatron.models.builder import XLSTMModelConfig

    return gpt_config_from_args(args, config=config or xlstm_config_from_args(args), model_config_cls=XLSTMModelConfig)


def build_xlstm_model(
    args: Namespace,
    config: XLSTMConfig | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection: Any = None,
) -> torch.nn.Module:
    """One model chunk (this pipeline stage / virtual stage) exactly as Megatron's loop builds it (the same builder),
    unwrapped (no DDP, no Float16Module). Needs Megatron's parallel state."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    model_config = model_config_from_args(args, config)
    builder = model_config.get_builder_cls()(model_config)
    pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
    return builder.build_model(pg_collection, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)

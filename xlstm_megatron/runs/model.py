"""Megatron arguments -> XLSTMConfig -> XLSTMModel: the one place a run's model is built.

The training engine's model builder, the converters, generation and the benchmarks all build through here, from
parsed-and-validated Megatron arguments (a live run's, or the `args` a Megatron checkpoint saved).

`--model-family transformer` (the Llama-style baseline) builds Megatron's own GPTModel from a plain
TransformerConfig through megatron.training's GPTModelBuilder and default layer spec (local or Transformer Engine),
so `pretrain()` trains it through the same engine; its FLOP and parameter counts come from here too.
"""

from __future__ import annotations

import copy
from argparse import Namespace
from typing import Any

import torch

from xlstm_megatron.layers.config import XLSTMConfig, have_transformer_engine
from xlstm_megatron.runs.errors import ConfigError


def is_transformer(args: Namespace) -> bool:
    """Whether `args` (a live run's or a checkpoint's saved ones) describe the Transformer baseline."""
    return getattr(args, "model_family", "xlstm") == "transformer"


def transformer_config_from_args(args: Namespace, **overrides: Any) -> Any:
    """The baseline's TransformerConfig: Megatron's own `core_transformer_config_from_args`, with the xLSTM
    families' Wang init (2 / (L sqrt(E))) for the output projections instead of Megatron's std / sqrt(2 L), so the
    families differ in their layers, not their init."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from xlstm_megatron.compat import cpu_config_overrides
    from xlstm_megatron.ops.init import normal_init_method, wang_init_std

    if not torch.cuda.is_available():
        overrides = {**cpu_config_overrides(), **overrides}
    if not have_transformer_engine():  # a GPU run's saved args (TE layers, fused RoPE) still build here, locally
        args = copy.copy(args)
        args.apply_rope_fusion = False
        if args.transformer_impl == "transformer_engine":
            args.transformer_impl = "local"
    try:
        config = core_transformer_config_from_args(args)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"bad model config: {e}".splitlines()[0]) from None
    if not args.init_method_xavier_uniform:
        config.output_layer_init_method = normal_init_method(wang_init_std(config.hidden_size, config.num_layers))
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def xlstm_config_from_args(args: Namespace, **overrides: Any) -> XLSTMConfig:
    """Megatron's own `core_transformer_config_from_args` with `config_class=XLSTMConfig`; on CPU the flags Megatron
    needs there (`cpu_config_overrides`) replace the saved GPU ones. Config checks become one-line ConfigErrors."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from xlstm_megatron.compat import cpu_config_overrides

    if is_transformer(args):
        raise ConfigError("these are the Transformer baseline's arguments (--model-family transformer), not an "
                          "xLSTM's; this command works on xLSTM runs only")
    if not torch.cuda.is_available():
        overrides = {**cpu_config_overrides(), **overrides}
    try:
        config = core_transformer_config_from_args(args, config_class=XLSTMConfig)
        for name, value in overrides.items():
            setattr(config, name, value)
        return config
    except (ValueError, AssertionError) as e:  # Megatron's own config checks are assertions
        raise ConfigError(f"bad model config: {e}".splitlines()[0]) from None


def model_config_from_args(args: Namespace, config: Any = None) -> Any:
    """The `XLSTMModelConfig` (a megatron.training GPTModelConfig whose builder makes an XLSTMModel) that Megatron's
    `pretrain()` builds its model chunks from; for the Transformer baseline Megatron's own GPTModelConfig (its
    builder makes a GPTModel with the default layer spec)."""
    from megatron.training.argument_utils import gpt_config_from_args

    from xlstm_megatron.models.builder import XLSTMModelConfig

    if is_transformer(args):
        return gpt_config_from_args(args, config=config or transformer_config_from_args(args))
    return gpt_config_from_args(args, config=config or xlstm_config_from_args(args), model_config_cls=XLSTMModelConfig)


def _vocab(args: Namespace) -> int:
    vocab = getattr(args, "padded_vocab_size", None)
    if vocab is None:
        raise ConfigError("the arguments carry no padded_vocab_size (validated args with a tokenizer built have it)")
    return int(vocab)


def train_flops_per_token_from_args(args: Namespace) -> int:
    """Training FLOPs per token of the run's model (either family; `models.flops`, 3x the forward)."""
    from xlstm_megatron.models.flops import train_flops_per_token, transformer_train_flops_per_token

    if is_transformer(args):
        return transformer_train_flops_per_token(transformer_config_from_args(args), _vocab(args), args.seq_length)
    return train_flops_per_token(xlstm_config_from_args(args), _vocab(args), args.seq_length)


def parameter_counts_from_args(args: Namespace) -> dict[str, int]:
    """{"total", "non_embedding", "embedding"} parameters of the run's model (either family), in closed form.
    `embedding` is the input embedding plus an untied output layer (Kaplan et al.'s non-embedding count leaves both
    out)."""
    from xlstm_megatron.models.param_count import parameter_breakdown, transformer_parameter_breakdown

    tied = not args.untie_embeddings_and_output_weights
    if is_transformer(args):
        positions = args.max_position_embeddings if args.position_embedding_type == "learned_absolute" else 0
        parts = transformer_parameter_breakdown(transformer_config_from_args(args), _vocab(args), tied, positions)
    else:
        parts = parameter_breakdown(xlstm_config_from_args(args), _vocab(args), tied)
    embedding = parts["embedding"] + parts["output_layer"]
    total = sum(parts.values())
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding}


def build_xlstm_model(
    args: Namespace,
    config: Any = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection: Any = None,
) -> torch.nn.Module:
    """One model chunk (this pipeline stage / virtual stage) exactly as Megatron's loop builds it (the same builder),
    unwrapped (no DDP, no Float16Module): an XLSTMModel, or the baseline's GPTModel. Needs Megatron's parallel
    state."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    model_config = model_config_from_args(args, config)
    builder = model_config.get_builder_cls()(model_config)
    pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
    return builder.build_model(pg_collection, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)

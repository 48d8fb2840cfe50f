"""ModuleSpecs for xLSTM stacks: architecture as data, built by Megatron's own TransformerBlock / GPTModel.

Each pattern symbol becomes the spec of its layer kind (`xlstm_megatron.layers.kinds`; the xLSTM and attention specs
are in `kind_specs`). `xlstm_block_spec` slices the layers of one pipeline (and virtual pipeline) stage, as
`get_gpt_decoder_block_spec` does, so it plugs into GPTModel and into `--spec xlstm_megatron.layers.specs
xlstm_block_spec`.

Transformer Engine variant (`use_te`): every projection is a TE linear, so FP8 (`config.fp8`) reaches all of them
through the fp8 context Megatron's TransformerBlock opens; the cells stay in the activation dtype.
"""

from __future__ import annotations

from typing import Any

from megatron.core.extensions.transformer_engine import TENorm
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from xlstm_megatron.layers.config import XLSTMConfig, have_transformer_engine, make_xlstm_config
from xlstm_megatron.layers.kind_specs import LARGE_TE_KEYS
from xlstm_megatron.layers.kinds import layer_kind
from xlstm_megatron.layers.norms import norm_class_for


def xlstm_layer_spec(config: XLSTMConfig, symbol: str, use_te: bool = False) -> ModuleSpec:
    """The layer spec of one pattern symbol in the config's block family."""
    return layer_kind(symbol, config.xlstm_block).spec(config, use_te)


def as_xlstm_config(config: TransformerConfig) -> XLSTMConfig:
    """The xLSTM fields live on the config itself, so a plain TransformerConfig is refused with the fix."""
    if isinstance(config, XLSTMConfig):
        return config
    raise ValueError(
        "the xLSTM spec needs an XLSTMConfig: build the config with "
        "core_transformer_config_from_args(args, config_class=XLSTMConfig) (or make_xlstm_config)"
    )


def xlstm_block_spec(
    config: Any, vp_stage: int | None = None, pp_rank: int | None = None, use_te: bool | None = None
) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage plus the final norm. `config` is an XLSTMConfig or Megatron's
    GPTModelConfig wrapping one (what the GPT builder passes to a `--spec` function)."""
    config = as_xlstm_config(getattr(config, "transformer", config))
    if use_te is None:  # Megatron's default impl is TE; like Megatron, fall back to local modules without it
        use_te = config.transformer_impl == "transformer_engine" and have_transformer_engine()
    elif use_te and not have_transformer_engine():
        raise ValueError("use_te=True needs transformer_engine, which does not import here; use the local spec")
    layers = [xlstm_layer_spec(config, s, use_te) for s in config.layer_pattern]
    if config.pipeline_model_parallel_layout is not None:
        raise ValueError("pipeline_model_parallel_layout is not supported by xLSTM stacks; use num_layers_in_*_stage")
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    layer_specs = layers[offset : offset + count]
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm(config, use_te))


def final_norm(config: XLSTMConfig, use_te: bool) -> Any:
    """The stack's final norm: TE's for Large under TE (its RMSNorm is the family's), else the family's own."""
    return TENorm if use_te and config.xlstm_block == "large" else norm_class_for(config)


__all__ = [
    "LARGE_TE_KEYS", "as_xlstm_config", "final_norm", "make_xlstm_config", "xlstm_block_spec", "xlstm_layer_spec",
]

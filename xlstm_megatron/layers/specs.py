"""ModuleSpecs for xLSTM stacks: architecture as data, built by Megatron's own TransformerBlock / GPTModel.

Each pattern symbol becomes one Megatron `TransformerLayer` spec:
    'm' (large)  RMSNorm -> MLSTMLargeMixer -> +res -> RMSNorm -> SwiGLU MLP -> +res
    'm' (v1)     LayerNorm -> MLSTMV1Mixer -> +res
    's' (v1)     LayerNorm -> SLSTMMixer -> +res -> LayerNorm -> GELU-gated MLP -> +res
    '*'          Megatron's own attention layer (+ MLP), with the family's norm
`xlstm_block_spec` slices the layers of one pipeline (and virtual pipeline) stage, as `get_gpt_decoder_block_spec`
does, so it plugs into GPTModel and into `--spec xlstm_megatron.layers.specs xlstm_block_spec`.

Transformer Engine variant (`use_te`): every projection is a TE linear, so FP8 (`config.fp8`) reaches all of them
through the fp8 context Megatron's TransformerBlock opens; the cells stay in the activation dtype. Large fuses its
RMSNorms into the following linears (TELayerNormColumnParallelLinear); v1's (1 + w) LayerNorm without bias has no TE
counterpart, so v1 keeps its own norms in front of plain TE linears. As in Megatron's local GPT spec, the local Large
layer saves its norms under the TE names (`sharded_state_dict_keys_map`): checkpoints of both variants share keys.
"""

from __future__ import annotations

from typing import Any

from megatron.core.extensions.transformer_engine import (
    TEColumnParallelLinear,
    TELayerNormColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from xlstm_megatron.layers.config import XLSTMConfig, have_transformer_engine, make_xlstm_config
from xlstm_megatron.layers.mlstm_large import MLSTMLargeMixer, MLSTMLargeMixerSubmodules
from xlstm_megatron.layers.mlstm_v1 import MLSTMV1Mixer, MLSTMV1MixerSubmodules
from xlstm_megatron.layers.norms import norm_class_for
from xlstm_megatron.layers.slstm_v1 import SLSTMMixer

# Local Large layers store their norms where the TE layer keeps them (inside the following linear).
LARGE_TE_KEYS = {
    "input_layernorm.": "self_attention.in_proj.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def _linears(use_te: bool, fuse_norm: bool) -> tuple[Any, Any]:
    """(column-parallel, row-parallel) linear classes. Specs are data: they may name TE classes without TE installed
    (only building them needs TE)."""
    if not use_te:
        return ColumnParallelLinear, RowParallelLinear
    return (TELayerNormColumnParallelLinear if fuse_norm else TEColumnParallelLinear), TERowParallelLinear


def _mlp_spec(use_te: bool, fuse_norm: bool) -> ModuleSpec:
    fc1, fc2 = _linears(use_te, fuse_norm)
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))


def xlstm_layer_spec(config: XLSTMConfig, symbol: str, use_te: bool = False) -> ModuleSpec:
    """The TransformerLayer spec of one pattern symbol. With TE, Large fuses each norm into the column-parallel
    linear after it (TELayerNormColumnParallelLinear; the layer's own norm slots become IdentityOp) and v1 keeps its
    norms in front of plain TE linears."""
    norm = norm_class_for(config)
    fuse = use_te and config.xlstm_block == "large"
    in_proj, out_proj = _linears(use_te, fuse)
    layer_norm = IdentityOp if fuse else norm
    bda = get_bias_dropout_add
    if symbol == "*":
        spec = get_gpt_layer_local_spec()
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
        return spec
    if config.xlstm_block == "large" and symbol == "m":
        mixer = ModuleSpec(
            module=MLSTMLargeMixer, submodules=MLSTMLargeMixerSubmodules(in_proj=in_proj, out_proj=out_proj)
        )
        subs = TransformerLayerSubmodules(
            input_layernorm=layer_norm, self_attention=mixer, self_attn_bda=bda,
            pre_mlp_layernorm=layer_norm, mlp=_mlp_spec(use_te, fuse), mlp_bda=bda,
            sharded_state_dict_keys_map={} if fuse else dict(LARGE_TE_KEYS),
        )
    elif symbol == "m":
        mixer = ModuleSpec(module=MLSTMV1Mixer, submodules=MLSTMV1MixerSubmodules(in_proj=in_proj, out_proj=out_proj))
        subs = TransformerLayerSubmodules(input_layernorm=norm, self_attention=mixer, self_attn_bda=bda)
    elif symbol == "s":
        subs = TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=ModuleSpec(module=SLSTMMixer), self_attn_bda=bda,
            pre_mlp_layernorm=norm, mlp=_mlp_spec(use_te, False), mlp_bda=bda,
        )
    else:
        raise ValueError(f"unknown layer symbol {symbol!r}")
    return ModuleSpec(module=TransformerLayer, submodules=subs)


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


__all__ = ["as_xlstm_config", "final_norm", "make_xlstm_config", "xlstm_block_spec", "xlstm_layer_spec"]

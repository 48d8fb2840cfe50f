"""ModuleSpecs for xLSTM stacks: architecture as data, built by Megatron's own TransformerBlock / GPTModel.

Each pattern symbol becomes one Megatron `TransformerLayer` spec:
    'm' (large)  RMSNorm -> MLSTMLargeMixer -> +res -> RMSNorm -> SwiGLU MLP -> +res
    'm' (v1)     LayerNorm -> MLSTMV1Mixer -> +res
    's' (v1)     LayerNorm -> SLSTMMixer -> +res -> LayerNorm -> GELU-gated MLP -> +res
    '*'          Megatron's own attention layer (+ MLP), with the family's norm
`xlstm_block_spec` slices the layers of one pipeline (and virtual pipeline) stage, as `get_gpt_decoder_block_spec`
does, so it plugs into GPTModel and into `--spec xlstm_megatron.layers.specs xlstm_block_spec`.
"""

from __future__ import annotations

from typing import Any

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

from xlstm_megatron.layers.config import XLSTMConfig, make_xlstm_config
from xlstm_megatron.layers.mlstm_large import MLSTMLargeMixer, MLSTMLargeMixerSubmodules
from xlstm_megatron.layers.mlstm_v1 import MLSTMV1Mixer, MLSTMV1MixerSubmodules
from xlstm_megatron.layers.norms import norm_class_for
from xlstm_megatron.layers.slstm_v1 import SLSTMMixer

# Megatron's TE extension module imports without TE (its classes are then placeholders), so ask TE itself.
try:
    import transformer_engine.pytorch  # noqa: F401

    HAVE_TE = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_TE = False
from megatron.core.extensions.transformer_engine import (  # noqa: E402
    TELayerNormColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
)


def _linears(use_te: bool) -> tuple[Any, Any]:
    # Specs are data: they may name TE classes without TE installed (only building them needs TE).
    if use_te:
        return TELayerNormColumnParallelLinear, TERowParallelLinear
    return ColumnParallelLinear, RowParallelLinear


def _mlp_spec(use_te: bool) -> ModuleSpec:
    fc1, fc2 = _linears(use_te)
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))


def xlstm_layer_spec(config: XLSTMConfig, symbol: str, use_te: bool = False) -> ModuleSpec:
    """The TransformerLayer spec of one pattern symbol. With TE, the input norm is fused into the first
    column-parallel linear (TELayerNormColumnParallelLinear), so the layer's own norm slots become IdentityOp."""
    norm = norm_class_for(config)
    in_proj, out_proj = _linears(use_te)
    if use_te and config.xlstm_block == "v1":
        # TE's fused norm has no (1 + w) LayerNorm without bias; v1 keeps its own norms and plain TE linears.
        raise ValueError("the Transformer Engine spec supports xlstm_block='large' only; use the local spec for v1")
    layer_norm = IdentityOp if use_te else norm
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
            pre_mlp_layernorm=layer_norm, mlp=_mlp_spec(use_te), mlp_bda=bda,
        )
    elif symbol == "m":
        mixer = ModuleSpec(module=MLSTMV1Mixer, submodules=MLSTMV1MixerSubmodules(in_proj=in_proj, out_proj=out_proj))
        subs = TransformerLayerSubmodules(input_layernorm=norm, self_attention=mixer, self_attn_bda=bda)
    elif symbol == "s":
        subs = TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=ModuleSpec(module=SLSTMMixer), self_attn_bda=bda,
            pre_mlp_layernorm=norm, mlp=_mlp_spec(use_te), mlp_bda=bda,
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
        use_te = config.transformer_impl == "transformer_engine" and HAVE_TE
    elif use_te and not HAVE_TE:
        raise ValueError("use_te=True needs transformer_engine, which does not import here; use the local spec")
    layers = [xlstm_layer_spec(config, s, use_te) for s in config.layer_pattern]
    if config.pipeline_model_parallel_layout is not None:
        raise ValueError("pipeline_model_parallel_layout is not supported by xLSTM stacks; use num_layers_in_*_stage")
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    final_norm = TENorm if use_te else norm_class_for(config)
    return TransformerBlockSubmodules(layer_specs=layers[offset : offset + count], layer_norm=final_norm)


__all__ = ["as_xlstm_config", "make_xlstm_config", "xlstm_block_spec", "xlstm_layer_spec"]

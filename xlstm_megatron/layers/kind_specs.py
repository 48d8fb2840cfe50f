"""TransformerLayer specs of the xLSTM and attention layer kinds (`kinds.py` maps pattern symbols to these).

    mLSTM (large)  RMSNorm -> MLSTMLargeMixer -> +res -> RMSNorm -> SwiGLU MLP -> +res
    mLSTM (v1)     LayerNorm -> MLSTMV1Mixer -> +res
    sLSTM (v1)     LayerNorm -> SLSTMMixer -> +res -> LayerNorm -> GELU-gated MLP -> +res
    attention      Megatron's own local GPT layer (attention + MLP), with the family's norm

With TE (`use_te`) every projection of the xLSTM kinds is a TE linear. Large fuses its RMSNorms into the following
linears (TELayerNormColumnParallelLinear; the layer's norm slots become IdentityOp); v1's (1 + w) LayerNorm without
bias has no TE counterpart, so v1 keeps its own norms in front of plain TE linears. The local Large layer saves its
norms under the TE names (`LARGE_TE_KEYS`), as Megatron's local GPT spec does: checkpoints of both variants share keys.
"""

from __future__ import annotations

from typing import Any

from megatron.core.extensions.transformer_engine import (
    TEColumnParallelLinear,
    TELayerNormColumnParallelLinear,
    TERowParallelLinear,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.layers.mlstm_large import MLSTMLargeMixer, MLSTMLargeMixerSubmodules
from xlstm_megatron.layers.mlstm_v1 import MLSTMV1Mixer, MLSTMV1MixerSubmodules
from xlstm_megatron.layers.norms import norm_class_for
from xlstm_megatron.layers.slstm_v1 import SLSTMMixer

# Local Large layers store their norms where the TE layer keeps them (inside the following linear).
LARGE_TE_KEYS = {
    "input_layernorm.": "self_attention.in_proj.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def linears(use_te: bool, fuse_norm: bool) -> tuple[Any, Any]:
    """(column-parallel, row-parallel) linear classes. Specs are data: they may name TE classes without TE installed
    (only building them needs TE)."""
    if not use_te:
        return ColumnParallelLinear, RowParallelLinear
    return (TELayerNormColumnParallelLinear if fuse_norm else TEColumnParallelLinear), TERowParallelLinear


def mlp_spec(use_te: bool, fuse_norm: bool) -> ModuleSpec:
    fc1, fc2 = linears(use_te, fuse_norm)
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))


def mlstm_large_spec(config: XLSTMConfig, use_te: bool) -> ModuleSpec:
    in_proj, out_proj = linears(use_te, use_te)
    norm = IdentityOp if use_te else norm_class_for(config)
    mixer = ModuleSpec(module=MLSTMLargeMixer, submodules=MLSTMLargeMixerSubmodules(in_proj=in_proj, out_proj=out_proj))
    bda = get_bias_dropout_add
    subs = TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=mixer, self_attn_bda=bda,
        pre_mlp_layernorm=norm, mlp=mlp_spec(use_te, use_te), mlp_bda=bda,
        sharded_state_dict_keys_map={} if use_te else dict(LARGE_TE_KEYS),
    )
    return ModuleSpec(module=TransformerLayer, submodules=subs)


def mlstm_v1_spec(config: XLSTMConfig, use_te: bool) -> ModuleSpec:
    in_proj, out_proj = linears(use_te, False)
    mixer = ModuleSpec(module=MLSTMV1Mixer, submodules=MLSTMV1MixerSubmodules(in_proj=in_proj, out_proj=out_proj))
    subs = TransformerLayerSubmodules(
        input_layernorm=norm_class_for(config), self_attention=mixer, self_attn_bda=get_bias_dropout_add
    )
    return ModuleSpec(module=TransformerLayer, submodules=subs)


def slstm_spec(config: XLSTMConfig, use_te: bool) -> ModuleSpec:
    norm, bda = norm_class_for(config), get_bias_dropout_add
    subs = TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=ModuleSpec(module=SLSTMMixer), self_attn_bda=bda,
        pre_mlp_layernorm=norm, mlp=mlp_spec(use_te, False), mlp_bda=bda,
    )
    return ModuleSpec(module=TransformerLayer, submodules=subs)


def attention_spec(config: XLSTMConfig, use_te: bool) -> ModuleSpec:
    """Megatron's local GPT layer, under either variant, with the family's norms."""
    spec = get_gpt_layer_local_spec()
    spec.submodules.input_layernorm = norm_class_for(config)
    spec.submodules.pre_mlp_layernorm = norm_class_for(config)
    return spec

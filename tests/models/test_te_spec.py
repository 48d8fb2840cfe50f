"""The Transformer Engine spec: its structure is checked everywhere; building it runs only where TE imports."""

from __future__ import annotations

import pytest
from megatron.core.extensions.transformer_engine import (
    TELayerNormColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp

from xlstm_megatron.layers.config import make_xlstm_config
from xlstm_megatron.layers.mlstm_large import MLSTMLargeMixer
from xlstm_megatron.layers.norms import XLSTMRMSNorm
from xlstm_megatron.layers.specs import HAVE_TE, xlstm_layer_spec

CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4)


def test_te_large_layer_spec_fuses_norms_into_linears():
    spec = xlstm_layer_spec(make_xlstm_config("large", **CFG), "m", use_te=True).submodules
    assert spec.input_layernorm is IdentityOp and spec.pre_mlp_layernorm is IdentityOp
    assert spec.self_attention.module is MLSTMLargeMixer
    assert spec.self_attention.submodules.in_proj is TELayerNormColumnParallelLinear
    assert spec.self_attention.submodules.out_proj is TERowParallelLinear
    assert spec.mlp.submodules.linear_fc1 is TELayerNormColumnParallelLinear
    assert spec.mlp.submodules.linear_fc2 is TERowParallelLinear


def test_local_large_layer_spec_keeps_own_norms():
    spec = xlstm_layer_spec(make_xlstm_config("large", **CFG), "m", use_te=False).submodules
    assert spec.input_layernorm is XLSTMRMSNorm and spec.pre_mlp_layernorm is XLSTMRMSNorm
    assert spec.self_attention.submodules.in_proj is ColumnParallelLinear
    assert spec.self_attention.submodules.out_proj is RowParallelLinear


def test_te_spec_refuses_v1():
    with pytest.raises(ValueError, match="xlstm_block='large' only"):
        xlstm_layer_spec(make_xlstm_config("v1", **CFG), "m", use_te=True)


@pytest.mark.skipif(HAVE_TE, reason="TE is installed here")
def test_te_requested_without_te_names_the_fix():
    from xlstm_megatron.layers.specs import xlstm_block_spec

    with pytest.raises(ValueError, match="transformer_engine"):
        xlstm_block_spec(make_xlstm_config("large", **CFG), use_te=True)


@pytest.mark.skipif(not HAVE_TE, reason="Transformer Engine does not import on this machine")
def test_te_block_spec_final_norm_is_te():
    from xlstm_megatron.layers.specs import xlstm_block_spec

    assert xlstm_block_spec(make_xlstm_config("large", **CFG), use_te=True).layer_norm is TENorm

"""The Transformer Engine spec and FP8: structure and validation are checked everywhere; building and running the TE
layers (and FP8) needs TE and a GPU, and runs only where both exist."""

from __future__ import annotations

import pytest
import torch
from megatron.core.extensions.transformer_engine import (
    TEColumnParallelLinear,
    TELayerNormColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp

from tests.megatron.dist import run_distributed
from xlstm_megatron.layers.config import have_transformer_engine, make_xlstm_config
from xlstm_megatron.layers.mlstm_large import MLSTMLargeMixer
from xlstm_megatron.layers.mlstm_v1 import MLSTMV1Mixer
from xlstm_megatron.layers.norms import XLSTMLayerNorm, XLSTMRMSNorm
from xlstm_megatron.layers.slstm_v1 import SLSTMMixer
from xlstm_megatron.layers.specs import LARGE_TE_KEYS, final_norm, xlstm_block_spec, xlstm_layer_spec

HAVE_TE = have_transformer_engine()
CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4)
V1_CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, xlstm_pattern="ms")


def test_te_large_layer_spec_fuses_norms_into_linears():
    spec = xlstm_layer_spec(make_xlstm_config("large", **CFG), "m", use_te=True).submodules
    assert spec.input_layernorm is IdentityOp and spec.pre_mlp_layernorm is IdentityOp
    assert spec.self_attention.module is MLSTMLargeMixer
    assert spec.self_attention.submodules.in_proj is TELayerNormColumnParallelLinear
    assert spec.self_attention.submodules.out_proj is TERowParallelLinear
    assert spec.mlp.submodules.linear_fc1 is TELayerNormColumnParallelLinear
    assert spec.mlp.submodules.linear_fc2 is TERowParallelLinear
    assert spec.sharded_state_dict_keys_map == {}  # TE's own names are the checkpoint keys


def test_local_large_layer_spec_keeps_own_norms_under_te_keys():
    spec = xlstm_layer_spec(make_xlstm_config("large", **CFG), "m", use_te=False).submodules
    assert spec.input_layernorm is XLSTMRMSNorm and spec.pre_mlp_layernorm is XLSTMRMSNorm
    assert spec.self_attention.submodules.in_proj is ColumnParallelLinear
    assert spec.self_attention.submodules.out_proj is RowParallelLinear
    assert spec.sharded_state_dict_keys_map == LARGE_TE_KEYS


def test_te_v1_layer_specs_use_te_linears_behind_own_norms():
    config = make_xlstm_config("v1", **V1_CFG)
    m = xlstm_layer_spec(config, "m", use_te=True).submodules
    assert m.input_layernorm is XLSTMLayerNorm and m.self_attention.module is MLSTMV1Mixer
    assert m.self_attention.submodules.in_proj is TEColumnParallelLinear
    assert m.self_attention.submodules.out_proj is TERowParallelLinear
    s = xlstm_layer_spec(config, "s", use_te=True).submodules
    assert s.self_attention.module is SLSTMMixer and s.pre_mlp_layernorm is XLSTMLayerNorm
    assert s.mlp.submodules.linear_fc1 is TEColumnParallelLinear and s.mlp.submodules.linear_fc2 is TERowParallelLinear
    assert m.sharded_state_dict_keys_map == s.sharded_state_dict_keys_map == {}  # same module names as local


@pytest.mark.skipif(HAVE_TE, reason="TE is installed here")
def test_te_requested_without_te_names_the_fix():
    with pytest.raises(ValueError, match="transformer_engine"):
        xlstm_block_spec(make_xlstm_config("large", **CFG), use_te=True)


def test_te_final_norm():
    assert final_norm(make_xlstm_config("large", **CFG), use_te=True) is TENorm
    assert final_norm(make_xlstm_config("large", **CFG), use_te=False) is XLSTMRMSNorm
    assert final_norm(make_xlstm_config("v1", **V1_CFG), use_te=True) is XLSTMLayerNorm


def _checkpoint_keys(block: str, cfg: dict) -> list[str]:
    """The keys the checkpoint files use (a ShardedTensor's `.key`, which the layer's keys map rewrites)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from tests.models.helpers import build_model, tiny_config

    state = build_model(tiny_config(block, **cfg), 64, 8, use_te=False).sharded_state_dict()
    return sorted(v.key for v in nested_values(state) if hasattr(v, "key"))


def test_local_large_checkpoint_stores_norms_under_te_names():
    """A checkpoint of the local Large model names its norms as the TE layer does, so either spec loads it."""
    keys = run_distributed(_checkpoint_keys, world_size=1, args=("large", CFG))[0]
    for layer in range(CFG["num_layers"]):
        prefix = f"decoder.layers.{layer}."
        assert prefix + "self_attention.in_proj.layer_norm_weight" in keys
        assert prefix + "mlp.linear_fc1.layer_norm_weight" in keys
        for linear in ("self_attention.in_proj", "self_attention.out_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            assert f"{prefix}{linear}._extra_state" in keys  # TE keeps its FP8 scaling state there
        assert not any(k.startswith(prefix + "input_layernorm") or k.startswith(prefix + "pre_mlp_layernorm")
                       for k in keys)


# ---- FP8 ------------------------------------------------------------------------------------------------------------

def test_fp8_gemm_shapes_per_rank():
    config = make_xlstm_config("large", num_layers=1, hidden_size=64, num_attention_heads=4)  # qk 8, v 16 per head
    assert config.fp8_gemm_shapes() == {
        "mLSTM in_proj": (4 * (2 * 8 + 2 * 16 + 2), 64), "mLSTM out_proj": (64, 64),
        "MLP linear_fc1": (2 * 192, 64), "MLP linear_fc2": (64, 192),
    }
    v1 = make_xlstm_config("v1", num_layers=2, hidden_size=64, num_attention_heads=4, xlstm_pattern="mm")
    assert v1.fp8_gemm_shapes() == {"mLSTM in_proj": (256, 64), "mLSTM out_proj": (64, 128)}  # no MLP without sLSTM


def test_fp8_refuses_shapes_fp8_gemms_cannot_take():
    with pytest.raises(ValueError, match=r"mLSTM in_proj weight is 220 x 72 .* rows divisible by 8"):
        make_xlstm_config("large", num_layers=1, hidden_size=72, num_attention_heads=2, fp8="hybrid")
    with pytest.raises(ValueError, match=r"mxfp8 recipe\) need rows divisible by 32"):
        make_xlstm_config("large", num_layers=1, hidden_size=64, num_attention_heads=4, fp8="hybrid",
                          fp8_recipe="mxfp8")


def test_tp_comm_overlap_is_refused():
    with pytest.raises(ValueError, match="drop tp_comm_overlap"):
        make_xlstm_config("large", **CFG, tp_comm_overlap=True)


def test_fp8_format_must_be_known():
    with pytest.raises(ValueError, match="fp8='e5m2' is unknown; use 'e4m3' or 'hybrid'"):
        make_xlstm_config("large", **CFG, fp8="e5m2")


def test_fp8_needs_the_transformer_engine_impl():
    with pytest.raises(ValueError, match="set transformer_impl='transformer_engine' or drop fp8"):
        make_xlstm_config("large", **CFG, fp8="hybrid", transformer_impl="local")


@pytest.mark.skipif(HAVE_TE, reason="TE is installed here")
def test_fp8_without_te_names_the_install():
    with pytest.raises(ValueError, match=r"fp8 needs Transformer Engine, which does not import here; install it"):
        make_xlstm_config("large", **CFG, fp8="hybrid")


# ---- TE and FP8 on a GPU --------------------------------------------------------------------------------------------

def _te_vs_local(block: str, cfg: dict, fp8: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Logits of the local model and of the TE model holding the same weights (copied key by key through the shared
    checkpoint keys), and the TE model's gradient norm after one backward."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from tests.models.helpers import build_model, tiny_config

    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 32), device="cuda")
    extra = dict(fp8="hybrid", fp8_recipe="delayed") if fp8 else {}
    local = build_model(tiny_config(block, **cfg), 64, 32, use_te=False).cuda()
    te = build_model(tiny_config(block, **cfg, **extra), 64, 32, use_te=True).cuda()
    def tensors(model) -> dict:  # factories applied (views): in_proj as q, k, v, o, i, f; GLU fc1 as its two halves
        state = model.sharded_state_dict()
        apply_factories(state)
        return {(v.key, v.global_offset): v for v in nested_values(state) if isinstance(v, ShardedTensor)}

    src, dst = tensors(local), tensors(te)
    assert set(src) == set(dst), set(src) ^ set(dst)
    with torch.no_grad():
        for key, sh in dst.items():
            sh.data.copy_(src[key].data)
    ref = local(tokens, None, None)
    out = te(tokens, None, None)
    out.float().square().mean().backward()
    grad = torch.sqrt(sum(p.grad.float().square().sum() for p in te.parameters() if p.grad is not None)).item()
    return ref.float().cpu(), out.float().detach().cpu(), grad


needs_te_gpu = pytest.mark.skipif(not (HAVE_TE and torch.cuda.is_available()), reason="needs Transformer Engine + GPU")


@needs_te_gpu
@pytest.mark.parametrize("block,cfg", [("large", CFG), ("v1", V1_CFG)])
def test_te_model_equals_local_model(block, cfg, monkeypatch):
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # cuBLASLt in TE would use TF32 for fp32 GEMMs; torch does not
    ref, out, grad = run_distributed(_te_vs_local, world_size=1, args=(block, cfg, False), backend="nccl")[0]
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-3)
    assert grad > 0


@needs_te_gpu
def test_fp8_large_model_runs_close_to_bf16():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need Ada / Hopper or newer")
    cfg = dict(num_layers=2, hidden_size=128, num_attention_heads=4)
    ref, out, grad = run_distributed(_te_vs_local, world_size=1, args=("large", cfg, True), backend="nccl")[0]
    assert torch.isfinite(out).all() and grad > 0
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # FP8 rounding, not a different function

"""The layer-kind registry: one entry per kind, whose closed forms equal what its spec builds, whose FLOPs are the
formulas of before the registry, and whose lookups fail with one line listing the known symbols."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import run_distributed
from xlstm_megatron.layers.config import XLSTM_RECOMPUTE_MODULES, make_xlstm_config
from xlstm_megatron.layers.kinds import LAYER_KINDS, LAYER_SYMBOLS, layer_kind
from xlstm_megatron.layers.mamba import have_mamba_ssm, mamba_layer_flops, mamba_layer_parameters
from xlstm_megatron.layers.specs import xlstm_layer_spec
from xlstm_megatron.models.flops import layer_flops_per_token
from xlstm_megatron.models.param_count import LAYER_KEYS, layer_parameters, parameter_breakdown

# Every kind in each family that allows it, with the code paths that change counts: GQA, biases, a plain MLP,
# qkv bias, a non-default conv width.
BUILT = {
    "large+attention+gqa+bias": ("large", dict(num_layers=3, hidden_size=64, num_attention_heads=4,
                                               xlstm_pattern="m*m", num_query_groups=2, add_bias_linear=True)),
    "large+qk_dim": ("large", dict(num_layers=2, hidden_size=128, num_attention_heads=8, mlstm_qk_dim=64)),
    "v1+attention+plain_mlp": ("v1", dict(num_layers=4, hidden_size=64, num_attention_heads=4, xlstm_pattern="ms*m",
                                          gated_linear_unit=False, add_qkv_bias=True, slstm_num_heads=2)),
    "v1+bias+conv3": ("v1", dict(num_layers=3, hidden_size=96, num_attention_heads=2, xlstm_pattern="smm",
                                 add_bias_linear=True, conv_kernel_size=3)),
}
NO_MAMBA = "mamba_ssm does not import here (it needs CUDA builds)"


def _config(name: str, **extra):
    family, cfg = BUILT[name]
    return make_xlstm_config(family, params_dtype=torch.float32, **{**cfg, **extra})


# ---- the table ------------------------------------------------------------------------------------------------


def test_one_kind_per_symbol_and_family():
    pairs = [(k.symbol, f) for k in LAYER_KINDS for f in k.families]
    assert len(pairs) == len(set(pairs))
    assert set(LAYER_SYMBOLS) == {"m", "s", "*", "M"}
    for kind in LAYER_KINDS:  # kinds sharing a symbol across families read the same in messages and breakdowns
        assert (kind.name, kind.breakdown_key) == (LAYER_SYMBOLS[kind.symbol], LAYER_KEYS[kind.symbol])
        assert kind.recompute_module is None or kind.recompute_module in XLSTM_RECOMPUTE_MODULES
    assert {k.recompute_module for k in LAYER_KINDS} - {None} == set(XLSTM_RECOMPUTE_MODULES)


def test_unknown_symbol_is_one_line_listing_the_known_ones():
    config = _config("large+qk_dim")
    for call in (lambda: layer_kind("x", "large"), lambda: layer_parameters(config, "x"),
                 lambda: layer_flops_per_token(config, "x", 64), lambda: xlstm_layer_spec(config, "x")):
        with pytest.raises(ValueError, match="unknown layer symbol 'x'") as info:
            call()
        assert "\n" not in str(info.value) and all(repr(s) in str(info.value) for s in LAYER_SYMBOLS)
    with pytest.raises(ValueError, match=r"unknown symbols \['x'\]; use .*'M': 'Mamba'"):
        make_xlstm_config("large", num_layers=2, hidden_size=64, num_attention_heads=4, xlstm_pattern="mx")


def test_kind_outside_its_family_names_the_fix():
    with pytest.raises(ValueError, match=r"^sLSTM layers \('s'\) exist only in the v1 family; set xlstm_block='v1'"):
        layer_kind("s", "large")
    assert layer_kind("m", "large") is not layer_kind("m", "v1")


def test_recompute_module_needs_its_kind_in_the_pattern():
    v1 = dict(num_layers=2, hidden_size=64, num_attention_heads=4, recompute_granularity="selective")
    with pytest.raises(ValueError, match=r"'slstm_cell' but xlstm_pattern has no sLSTM layer \('s'\); drop it"):
        make_xlstm_config("v1", **v1, xlstm_pattern="m*", recompute_modules=["slstm_cell"])
    with pytest.raises(ValueError, match=r"'mlstm_cell' but xlstm_pattern has no mLSTM layer \('m'\); drop it"):
        make_xlstm_config("v1", **v1, xlstm_pattern="s*", recompute_modules=["mlstm_cell"])
    assert make_xlstm_config("v1", **v1, xlstm_pattern="sm", recompute_modules=["mlstm_cell", "slstm_cell"])


# ---- closed forms against built layers ------------------------------------------------------------------------


def _built_layer_parameters(family: str, cfg: dict) -> list[tuple[str, int, int]]:
    from tests.models.helpers import build_model, tiny_config

    config = tiny_config(family, **cfg)
    model = build_model(config, 128, 32)
    return [(symbol, sum(p.numel() for p in layer.parameters()), layer_kind(symbol, family).parameters(config))
            for symbol, layer in zip(config.layer_pattern, model.decoder.layers, strict=True)]


@pytest.mark.parametrize("name", BUILT)
def test_each_kind_counts_its_built_layer(name):
    family, cfg = BUILT[name]
    rows = run_distributed(_built_layer_parameters, world_size=1, args=(family, cfg))[0]
    assert [real for _, real, _ in rows] == [expected for _, _, expected in rows], rows


# The formulas of before the registry (models/flops.py), recorded: layer FLOPs per token at S = 33 and 4096.
FLOPS_BEFORE = {
    "large+attention+gqa+bias": {"m": (115968, 121920), "*": (102528, 622592)},
    "large+qk_dim": {"m": (446592, 446592)},
    "v1+attention+plain_mlp": {"m": (92928, 108800), "s": (82432, 82432), "*": (86144, 606208)},
    "v1+bias+conv3": {"m": (220416, 244224), "s": (148032, 148032)},
}
PARAMS_BEFORE = {
    "large+attention+gqa+bias": {"m": 54472, "*": 49920}, "large+qk_dim": {"m": 215440},
    "v1+attention+plain_mlp": {"m": 30152, "s": 41728, "*": 41280}, "v1+bias+conv3": {"m": 61636, "s": 75136},
}


@pytest.mark.parametrize("name", BUILT)
def test_flops_and_parameters_unchanged(name):
    config = _config(name, mlstm_chunk_size=32 if name == "large+qk_dim" else 64)
    assert {s: (layer_flops_per_token(config, s, 33), layer_flops_per_token(config, s, 4096))
            for s in FLOPS_BEFORE[name]} == FLOPS_BEFORE[name]
    assert {s: layer_parameters(config, s) for s in PARAMS_BEFORE[name]} == PARAMS_BEFORE[name]


def test_fp8_shapes_are_the_union_of_the_pattern_kinds():
    v1 = _config("v1+attention+plain_mlp", tensor_model_parallel_size=2)
    assert v1.fp8_gemm_shapes() == {"mLSTM in_proj": (128, 64), "mLSTM out_proj": (64, 64),
                                    "MLP linear_fc1": (128, 64), "MLP linear_fc2": (64, 64)}
    large_attention_only = make_xlstm_config("large", num_layers=2, hidden_size=64, num_attention_heads=4,
                                             xlstm_pattern="**")
    assert large_attention_only.fp8_gemm_shapes() == {}  # '*' is Megatron's local layer: no TE linear, no FP8


# ---- Mamba ('M') ----------------------------------------------------------------------------------------------

MAMBA = dict(num_layers=2, hidden_size=64, num_attention_heads=4, xlstm_pattern="mM", mamba_state_dim=16,
             mamba_head_dim=16, mamba_num_groups=2)


def test_mamba_closed_forms_without_mamba_ssm():
    config = make_xlstm_config("large", **MAMBA)  # sizing a hybrid stack needs no mamba_ssm
    # d_inner 128, 8 heads: input norm, in_proj z|x|B|C|dt, conv (x|B|C) with bias, dt_bias/A_log/D, gated norm, out
    assert mamba_layer_parameters(config) == 64 + 64 * 328 + 192 * 5 + 3 * 8 + 128 + 128 * 64
    parts = parameter_breakdown(config, 100)
    assert parts["mamba_layers"] == mamba_layer_parameters(config)
    assert parts["mlstm_layers"] == layer_parameters(config, "m")
    assert config.fp8_gemm_shapes()["Mamba in_proj"] == (328, 64)
    # linear in the sequence: the SSD scan's per-token cost stops growing at its chunk (128)
    assert mamba_layer_flops(config, 64) < mamba_layer_flops(config, 128) == mamba_layer_flops(config, 8192)


def test_mamba_config_errors_are_one_line():
    with pytest.raises(ValueError, match="not divisible by mamba_num_groups=3") as info:
        make_xlstm_config("v1", **{**MAMBA, "mamba_num_groups": 3})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="tensor_model_parallel_size=4"):
        make_xlstm_config("large", **MAMBA, tensor_model_parallel_size=4)  # 2 groups over 4 ranks


@pytest.mark.skipif(have_mamba_ssm(), reason="mamba_ssm imports here")
def test_mamba_spec_without_mamba_ssm_is_one_line():
    config = make_xlstm_config("large", **MAMBA)
    for use_te in (False, True):
        with pytest.raises(ValueError, match=r"^the Mamba layer \('M'\) needs mamba_ssm.*install mamba-ssm") as info:
            xlstm_layer_spec(config, "M", use_te)
        assert "\n" not in str(info.value)


def _built_mamba_parameters(family: str) -> tuple[int, int]:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.mamba_layer import MambaLayer
    from megatron.core.transformer.spec_utils import build_module

    from tests.models.helpers import tiny_config

    config = tiny_config(family, **MAMBA)
    layer = build_module(xlstm_layer_spec(config, "M"), config=config, layer_number=1,
                         pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    assert isinstance(layer, MambaLayer)
    return sum(p.numel() for p in layer.parameters()), mamba_layer_parameters(config)


@pytest.mark.skipif(not have_mamba_ssm() or not torch.cuda.is_available(), reason=NO_MAMBA)
@pytest.mark.parametrize("family", ["large", "v1"])
def test_mamba_counts_megatrons_built_layer(family):
    real, expected = run_distributed(_built_mamba_parameters, world_size=1, args=(family,))[0]
    assert real == expected

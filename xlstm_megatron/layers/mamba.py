"""The Mamba-2 layer kind ('M', as in Megatron's hybrid patterns): Megatron-Core's MambaLayer / MambaMixer.

Sizes come from Megatron's own config fields (mamba_state_dim N, mamba_head_dim P, mamba_num_groups G,
mamba_num_heads) and MambaMixer's constructor defaults (expand, d_conv, chunk_size), which the spec passes explicitly
so the closed forms below cannot drift from what is built. Building needs `mamba_ssm` (CUDA builds); the closed
forms do not, so a hybrid stack can be sized anywhere.
"""

from __future__ import annotations

import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.layers.costs import Shapes
from xlstm_megatron.layers.kind_specs import linears
from xlstm_megatron.layers.norms import norm_class_for

MAMBA_EXPAND = 2  # d_inner = expand * hidden_size unless mamba_num_heads is given
MAMBA_CONV = 4
MAMBA_CHUNK = 128
# Local Large layers store the input norm where TELayerNormColumnParallelLinear keeps it, as the mLSTM layers do.
MAMBA_TE_KEYS = {"norm.": "mixer.in_proj.layer_norm_"}


@functools.cache
def have_mamba_ssm() -> bool:
    """Whether Megatron's MambaMixer can be built here (it needs mamba_ssm's Triton kernels)."""
    try:
        from megatron.core.ssm import mamba_mixer
    except ImportError:
        return False
    return bool(mamba_mixer.HAVE_MAMBA_SSM)


def require_mamba_ssm() -> None:
    """Raise one line naming the fix where the Mamba layer cannot be built (counting it works anywhere)."""
    if not have_mamba_ssm():
        raise ValueError("the Mamba layer ('M') needs mamba_ssm, which does not import here; install mamba-ssm and "
                         "causal-conv1d (CUDA builds) or drop 'M' from xlstm_pattern")


def mamba_sizes(config: XLSTMConfig) -> tuple[int, int]:
    """(d_inner, heads) as MambaMixer derives them."""
    if config.mamba_num_heads is not None:
        return config.mamba_num_heads * config.mamba_head_dim, config.mamba_num_heads
    d_inner = MAMBA_EXPAND * config.hidden_size
    return d_inner, d_inner // config.mamba_head_dim


def _in_proj_width(config: XLSTMConfig) -> int:
    d_inner, heads = mamba_sizes(config)
    return 2 * d_inner + 2 * config.mamba_num_groups * config.mamba_state_dim + heads  # z | x | B | C | dt


def mamba_layer_parameters(config: XLSTMConfig) -> int:
    """Input norm, in_proj (no bias), depthwise conv over x | B | C with bias, per-head dt_bias / A_log / D, gated
    RMSNorm weight, out_proj (no bias)."""
    E = config.hidden_size
    d_inner, heads = mamba_sizes(config)
    conv = (d_inner + 2 * config.mamba_num_groups * config.mamba_state_dim) * (MAMBA_CONV + 1)
    return E + E * _in_proj_width(config) + conv + 3 * heads + d_inner + d_inner * E


def mamba_layer_flops(config: XLSTMConfig, seq_length: int) -> int:
    """Projections, the conv, and the chunkwise SSD scan as its kernel multiplies it: per chunk of Q tokens the full
    Q x Q block C B^T per group applied to x per head, the chunk-end state B^T x and its read-out C h (N x P per
    head each). Gating, the D skip and the norm are element-wise and left out."""
    E, N, G, P = config.hidden_size, config.mamba_state_dim, config.mamba_num_groups, config.mamba_head_dim
    d_inner, heads = mamba_sizes(config)
    chunk = min(MAMBA_CHUNK, seq_length)
    proj = 2 * E * _in_proj_width(config) + 2 * d_inner * E
    conv = 2 * MAMBA_CONV * (d_inner + 2 * G * N)
    ssd = 2 * chunk * (G * N + heads * P) + 4 * heads * N * P
    return proj + conv + ssd


def mamba_fp8_shapes(config: XLSTMConfig) -> Shapes:
    tp = config.tensor_model_parallel_size
    d_inner, _ = mamba_sizes(config)
    return {"Mamba in_proj": (_in_proj_width(config) // tp, config.hidden_size),
            "Mamba out_proj": (config.hidden_size, d_inner // tp)}


def validate_mamba(config: XLSTMConfig) -> None:
    """MambaMixer's asserts, as one-line errors at config time."""
    d_inner, heads = mamba_sizes(config)
    P, G, tp = config.mamba_head_dim, config.mamba_num_groups, config.tensor_model_parallel_size
    if d_inner % P:
        raise ValueError(f"the Mamba inner width {d_inner} ({MAMBA_EXPAND} x hidden_size) is not divisible by "
                         f"mamba_head_dim={P}; change mamba_head_dim or set mamba_num_heads")
    if heads % G:
        raise ValueError(f"the {heads} Mamba heads are not divisible by mamba_num_groups={G}; change mamba_num_groups")
    if heads % tp or G % tp:
        raise ValueError(f"Mamba heads ({heads}) and mamba_num_groups ({G}) must be divisible by "
                         f"tensor_model_parallel_size={tp}")


def mamba_spec(config: XLSTMConfig, use_te: bool) -> ModuleSpec:
    """Megatron's MambaLayer in a TransformerBlock slot. With TE, Large fuses the input norm into in_proj as
    Megatron's hybrid spec does; v1 keeps its own norm in front of a plain TE linear."""
    require_mamba_ssm()
    from megatron.core.ssm.mamba_layer import MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules

    from xlstm_megatron.layers.mamba_layer import MambaStackLayer

    fuse = use_te and config.xlstm_block == "large"
    in_proj, out_proj = linears(use_te, fuse)
    mixer = ModuleSpec(
        module=MambaMixer, submodules=MambaMixerSubmodules(in_proj=in_proj, out_proj=out_proj),
        params=dict(expand=MAMBA_EXPAND, d_conv=MAMBA_CONV, chunk_size=MAMBA_CHUNK),
    )
    keys = dict(MAMBA_TE_KEYS) if config.xlstm_block == "large" and not use_te else {}
    subs = MambaLayerSubmodules(norm=IdentityOp if fuse else norm_class_for(config), mixer=mixer,
                                mamba_bda=get_bias_dropout_add, sharded_state_dict_keys_map=keys)
    return ModuleSpec(module=MambaStackLayer, submodules=subs)

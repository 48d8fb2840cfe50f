"""Closed forms of the xLSTM and attention layer kinds, from the config alone (no module is built).

For each kind: exact parameters of one TransformerLayer at TP=1 (norms included: all weight-only, RMSNorm or v1's
LayerNorm without bias; the TE spec moves Large's norm weights into `TELayerNormColumnParallelLinear`, same count),
forward matrix-multiply FLOPs per token (2 per multiply-add; norms, element-wise gate math and the like are O(E) per
token and left out) and the weights that run as FP8 GEMMs, as (rows, columns) on one TP rank.

FLOPs count what the implementation multiplies: the chunkwise mLSTM cell computes the full L x L block of each chunk,
masked, so its intra-chunk term is 2 L (DQK + DV) per token and head.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from xlstm_megatron.layers.config import XLSTMConfig

Shapes = dict[str, tuple[int, int]]


def linear_parameters(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


# ---- shared parts: Megatron's MLP and SelfAttention --------------------------------------------------------------


def mlp_parameters(config: TransformerConfig) -> int:
    """Megatron `MLP`: fc1 E -> F (x2 for a gated linear unit), fc2 F -> E, biases iff add_bias_linear."""
    E, F, bias = config.hidden_size, config.ffn_hidden_size, config.add_bias_linear
    fc1_out = 2 * F if config.gated_linear_unit else F
    return linear_parameters(E, fc1_out, bias) + linear_parameters(F, E, bias)


def mlp_flops_per_token(config: TransformerConfig) -> int:
    E, F = config.hidden_size, config.ffn_hidden_size
    return 2 * E * F * (2 if config.gated_linear_unit else 1) + 2 * F * E


def mlp_fp8_shapes(config: XLSTMConfig) -> Shapes:
    """The gated MLP of the xLSTM layers (always a GLU: fc1 holds gate | up)."""
    tp, E, ff = config.tensor_model_parallel_size, config.hidden_size, config.ffn_hidden_size
    return {"MLP linear_fc1": (2 * ff // tp, E), "MLP linear_fc2": (E, ff // tp)}


def attention_parameters(config: TransformerConfig) -> int:
    """Megatron `SelfAttention` of the local GPT layer spec (no q/k layernorm in that spec)."""
    E, kv = config.hidden_size, config.kv_channels
    q_size, kv_size = kv * config.num_attention_heads, kv * config.num_query_groups
    qkv = linear_parameters(E, q_size + 2 * kv_size, config.add_bias_linear or config.add_qkv_bias)
    return qkv + linear_parameters(q_size, E, config.add_bias_linear)


def attention_flops_per_token(config: TransformerConfig, seq_length: int, causal: bool = True) -> int:
    """Megatron self-attention, per token: q/k/v (GQA: fewer k/v heads) and output projections, and the S-long
    scores QK^T and values AV. `causal` counts the lower triangle only (what a causal kernel, flash / Transformer
    Engine, multiplies, and Megatron's own FLOP formula); False counts the full S x S square that the local
    (unfused) attention multiplies before masking, which is what torch's FLOP counter sees on CPU."""
    E, heads = config.hidden_size, config.num_attention_heads
    q = config.kv_channels * heads
    kv = config.kv_channels * (config.num_query_groups or heads)
    context = seq_length / 2 if causal else seq_length  # mean number of keys a query attends to
    return int(2 * E * (q + 2 * kv) + 2 * 2 * context * q + 2 * q * E)


def attention_layer_parameters(config: XLSTMConfig) -> int:
    E = config.hidden_size
    return E + attention_parameters(config) + E + mlp_parameters(config)


def attention_layer_flops(config: XLSTMConfig, seq_length: int) -> int:
    return attention_flops_per_token(config, seq_length) + mlp_flops_per_token(config)


def attention_fp8_shapes(config: XLSTMConfig) -> Shapes:
    """None: '*' layers are Megatron's local GPT layer even under TE, and FP8 reaches only TE linears."""
    return {}


# ---- mLSTM -----------------------------------------------------------------------------------------------------


def mlstm_cell_flops_per_token(qk_head_dim: int, v_head_dim: int, heads: int, chunk: int) -> int:
    """Chunkwise mLSTM cell, per token: intra-chunk scores and values, reading the chunk-start state (C and n) and
    writing the chunk-end C (the n update is an element-wise sum)."""
    per_head = 2 * chunk * (qk_head_dim + v_head_dim) + 4 * qk_head_dim * v_head_dim + 2 * qk_head_dim
    return heads * per_head


def mlstm_large_mixer_parameters(config: XLSTMConfig) -> int:
    E, NH = config.hidden_size, config.num_attention_heads
    dqk = config.mlstm_qk_width // NH
    dv = config.mlstm_v_width // NH
    in_proj = linear_parameters(E, NH * (2 * dqk + 2 * dv + 2), bias=False)  # q | k | v | o | i | f, never a bias
    gates_and_norm = 2 * NH + NH * dv  # input/forget gate biases, per-head norm weight
    return in_proj + gates_and_norm + linear_parameters(NH * dv, E, config.add_bias_linear)


def mlstm_large_layer_parameters(config: XLSTMConfig) -> int:
    """RMSNorm, MLSTMLargeMixer (fused q|k|v|o|i|f in_proj, i/f gate biases, per-head norm, out_proj), RMSNorm,
    gated MLP."""
    E = config.hidden_size
    return E + mlstm_large_mixer_parameters(config) + E + mlp_parameters(config)


def mlstm_large_layer_flops(config: XLSTMConfig, seq_length: int) -> int:
    E, NH = config.hidden_size, config.num_attention_heads
    qk, v = config.mlstm_qk_width, config.mlstm_v_width
    proj = 2 * E * (2 * qk + 2 * v + 2 * NH) + 2 * v * E
    cell = mlstm_cell_flops_per_token(qk // NH, v // NH, NH, min(config.mlstm_chunk_size, seq_length))
    return proj + cell + mlp_flops_per_token(config)


def mlstm_large_fp8_shapes(config: XLSTMConfig) -> Shapes:
    NH, E = config.num_attention_heads, config.hidden_size
    nh = NH // config.tensor_model_parallel_size
    qk, v = config.mlstm_qk_width // NH, config.mlstm_v_width // NH
    return {"mLSTM in_proj": (nh * (2 * qk + 2 * v + 2), E), "mLSTM out_proj": (E, nh * v), **mlp_fp8_shapes(config)}


def mlstm_v1_mixer_parameters(config: XLSTMConfig) -> int:
    E, NH, Di = config.hidden_size, config.num_attention_heads, config.mlstm_inner_size
    K, bs = config.conv_kernel_size, config.mlstm_qkv_block_size
    conv = Di * K + Di
    qkv = 3 * (Di // bs) * bs * bs
    gates = 3 * Di * NH * 2 + NH * 2  # Linear(cat[q, k, v] -> NH) for i and f, with bias
    skip_and_norm = 2 * Di
    bias = config.add_bias_linear
    return linear_parameters(E, 2 * Di, bias) + conv + qkv + gates + skip_and_norm + linear_parameters(Di, E, bias)


def mlstm_v1_layer_parameters(config: XLSTMConfig) -> int:
    """LayerNorm, MLSTMV1Mixer (in_proj x|z, conv + bias, block-diagonal q/k/v, gate weight + bias, learnable skip,
    group norm, out_proj); no MLP (the up-projection is the block's FFN)."""
    return config.hidden_size + mlstm_v1_mixer_parameters(config)


def mlstm_v1_layer_flops(config: XLSTMConfig, seq_length: int) -> int:
    E, NH = config.hidden_size, config.num_attention_heads
    inner, bs, K = config.mlstm_inner_size, config.mlstm_qkv_block_size, config.conv_kernel_size
    dh = inner // NH
    proj = 2 * E * 2 * inner + 2 * inner * E  # up (x | z) and down
    small = 2 * K * inner + 3 * 2 * inner * bs + 2 * 3 * inner * 2 * NH  # conv, block-diagonal q/k/v, gates
    return proj + small + mlstm_cell_flops_per_token(dh, dh, NH, min(config.mlstm_chunk_size, seq_length))


def mlstm_v1_fp8_shapes(config: XLSTMConfig) -> Shapes:
    inner = config.mlstm_inner_size // config.tensor_model_parallel_size
    return {"mLSTM in_proj": (2 * inner, config.hidden_size), "mLSTM out_proj": (config.hidden_size, inner)}


# ---- sLSTM (v1) ------------------------------------------------------------------------------------------------


def slstm_mixer_parameters(config: XLSTMConfig) -> int:
    E, K = config.hidden_size, config.conv_kernel_size
    DH = E // config.slstm_heads
    conv = E * K + E
    gate_proj = 4 * E * DH  # i, f, z, o: NH block-diagonal DH x DH projections each
    recurrent = 4 * E * DH
    return conv + gate_proj + recurrent + 4 * E + E  # + gate biases (NH, 4, DH) + group norm weight


def slstm_layer_parameters(config: XLSTMConfig) -> int:
    """LayerNorm, SLSTMMixer (conv + bias, block-diagonal gate projections, recurrent weights, gate biases, group
    norm), LayerNorm, gated MLP."""
    E = config.hidden_size
    return E + slstm_mixer_parameters(config) + E + mlp_parameters(config)


def slstm_layer_flops(config: XLSTMConfig, seq_length: int) -> int:
    E, K = config.hidden_size, config.conv_kernel_size
    dh = E // config.slstm_heads
    # block-diagonal input and recurrent weights: 4 gates x (DH x DH) per head, each
    return 2 * K * E + 2 * (4 * E * dh) + 2 * (4 * E * dh) + mlp_flops_per_token(config)


def slstm_fp8_shapes(config: XLSTMConfig) -> Shapes:
    """Only the MLP: the sLSTM's block-diagonal projections and recurrence stay in the activation dtype."""
    return mlp_fp8_shapes(config)


def validate_slstm(config: XLSTMConfig) -> None:
    sh, tp = config.slstm_heads, config.tensor_model_parallel_size
    if sh % tp:
        raise ValueError(f"slstm_num_heads={sh} is not divisible by tensor_model_parallel_size={tp}")
    if config.hidden_size % sh:
        raise ValueError(f"hidden_size={config.hidden_size} is not divisible by slstm_num_heads={sh}")

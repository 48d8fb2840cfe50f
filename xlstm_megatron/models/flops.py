"""Model FLOPs of an xLSTM stack: matrix-multiply FLOPs (2 per multiply-add) of the forward pass, cells included.

Counts what the implementation multiplies: projections, the depthwise convs, the mLSTM chunkwise cell (it computes the
full L x L block of each chunk, masked, so its intra-chunk term is 2 L (DQK + DV) per token and head), the sLSTM
recurrence and the output layer. Norms, gates' element-wise math, the embedding lookup and the loss are left out
(they are O(E) per token against O(E^2)). A training step costs 3x the forward (backward = 2x forward), the usual
convention for MFU; activation recomputation is not counted. The Transformer baseline's count is at the end.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from xlstm_megatron.layers.config import XLSTMConfig


def mlstm_cell_flops_per_token(qk_head_dim: int, v_head_dim: int, heads: int, chunk: int) -> int:
    """Chunkwise mLSTM cell, per token: intra-chunk scores and values, reading the chunk-start state (C and n) and
    writing the chunk-end C (the n update is an element-wise sum)."""
    per_head = 2 * chunk * (qk_head_dim + v_head_dim) + 4 * qk_head_dim * v_head_dim + 2 * qk_head_dim
    return heads * per_head


def _mlp(config: TransformerConfig) -> int:
    E, F = config.hidden_size, config.ffn_hidden_size
    return 2 * E * F * (2 if config.gated_linear_unit else 1) + 2 * F * E


def layer_flops_per_token(config: XLSTMConfig, symbol: str, seq_length: int) -> int:
    E, NH = config.hidden_size, config.num_attention_heads
    chunk = min(config.mlstm_chunk_size, seq_length)
    if symbol == "m" and config.xlstm_block == "large":
        qk, v = config.mlstm_qk_width, config.mlstm_v_width
        proj = 2 * E * (2 * qk + 2 * v + 2 * NH) + 2 * v * E
        return proj + mlstm_cell_flops_per_token(qk // NH, v // NH, NH, chunk) + _mlp(config)
    if symbol == "m":
        inner, bs, K = config.mlstm_inner_size, config.mlstm_qkv_block_size, config.conv_kernel_size
        dh = inner // NH
        proj = 2 * E * 2 * inner + 2 * inner * E  # up (x | z) and down
        small = 2 * K * inner + 3 * 2 * inner * bs + 2 * 3 * inner * 2 * NH  # conv, block-diagonal q/k/v, gates
        return proj + small + mlstm_cell_flops_per_token(dh, dh, NH, chunk)
    if symbol == "s":
        dh, K = E // config.slstm_heads, config.conv_kernel_size
        # block-diagonal input and recurrent weights: 4 gates x (DH x DH) per head, each
        return 2 * K * E + 2 * (4 * E * dh) + 2 * (4 * E * dh) + _mlp(config)
    if symbol == "*":
        kv = config.kv_channels * config.num_attention_heads
        groups = config.num_query_groups or config.num_attention_heads
        kv_heads = config.kv_channels * groups
        qkv = 2 * E * (kv + 2 * kv_heads)
        scores = 2 * 2 * seq_length * kv / 2  # causal: QK^T and AV over half the context on average
        return int(qkv + scores + 2 * kv * E + _mlp(config))
    raise ValueError(f"unknown layer symbol {symbol!r}")


def forward_flops_per_token(config: XLSTMConfig, vocab_size: int, seq_length: int) -> int:
    layers = sum(layer_flops_per_token(config, s, seq_length) for s in config.layer_pattern)
    return layers + 2 * config.hidden_size * vocab_size


def train_flops_per_token(config: XLSTMConfig, vocab_size: int, seq_length: int) -> int:
    return 3 * forward_flops_per_token(config, vocab_size, seq_length)


# ---- the Transformer baseline (Megatron's GPTModel, `--model-family transformer`) ------------------------------


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


def transformer_forward_flops_per_token(config: TransformerConfig, vocab_size: int, seq_length: int,
                                        causal: bool = True) -> int:
    """Forward FLOPs per token of the baseline: per layer attention + (gated) MLP, then the output layer (norms,
    RoPE, softmax and the loss are O(E) per token and left out, as for the xLSTM stacks)."""
    layer = attention_flops_per_token(config, seq_length, causal) + _mlp(config)
    return config.num_layers * layer + 2 * config.hidden_size * vocab_size


def transformer_train_flops_per_token(config: TransformerConfig, vocab_size: int, seq_length: int) -> int:
    """3x the forward, as `train_flops_per_token` (causal attention)."""
    return 3 * transformer_forward_flops_per_token(config, vocab_size, seq_length)


# Dense peak TFLOP/s per device (bf16, fp32 without TF32) from the vendors' data sheets, for MFU.
PEAK_TFLOPS = {"H100": (989.0, 67.0), "H200": (989.0, 67.0), "A100": (312.0, 19.5), "B200": (2250.0, 80.0)}


def peak_tflops_per_device(bf16: bool) -> float | None:
    """The peak of this process's GPU, or None where unknown (CPU, other GPUs)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (half, single) in PEAK_TFLOPS.items():
        if key in name:
            return half if bf16 else single
    return None

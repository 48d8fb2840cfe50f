"""Exact parameter count of an `XLSTMModel` from its config, in closed form (no model is built).

The count is the number of unique trainable scalars of the logical (TP=1) model, i.e. what
`sum(p.numel() for p in XLSTMModel(config, vocab_size).parameters())` gives at TP=1, PP=1:

- embedding: vocab x E word embeddings (no position embeddings: xLSTM models have none);
- per layer, by pattern symbol (see `xlstm_megatron.layers.specs`):
    'm' large  RMSNorm, MLSTMLargeMixer (fused q|k|v|o|i|f in_proj, i/f gate biases, per-head norm, out_proj),
               RMSNorm, gated MLP
    'm' v1     LayerNorm, MLSTMV1Mixer (in_proj x|z, conv + bias, block-diagonal q/k/v, gate weight + bias,
               learnable skip, group norm, out_proj); no MLP (the up-projection is the block's FFN)
    's' v1     LayerNorm, SLSTMMixer (conv + bias, block-diagonal gate projections, recurrent weights, gate biases,
               group norm), LayerNorm, gated MLP
    '*'        norm, Megatron attention (linear_qkv with GQA, linear_proj), norm, MLP
- final norm (E) and output layer (vocab x E, absent when embeddings are shared; Megatron's output layer has no bias).

All norms are weight-only (RMSNorm, and the v1 LayerNorm without bias). The Transformer Engine spec of the 'large'
family moves each input norm's weight into `TELayerNormColumnParallelLinear` (`layer_norm_weight`): the same count.
The padded vocabulary is the caller's: pass the model's vocab size (after padding), not the tokenizer's.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from xlstm_megatron.layers.config import XLSTMConfig


def _linear(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def mlp_parameters(config: TransformerConfig) -> int:
    """Megatron `MLP`: fc1 E -> F (x2 for a gated linear unit), fc2 F -> E, biases iff add_bias_linear."""
    E, F, bias = config.hidden_size, config.ffn_hidden_size, config.add_bias_linear
    fc1_out = 2 * F if config.gated_linear_unit else F
    return _linear(E, fc1_out, bias) + _linear(F, E, bias)


def mlstm_large_mixer_parameters(config: XLSTMConfig) -> int:
    E, NH = config.hidden_size, config.num_attention_heads
    dqk = config.mlstm_qk_width // NH
    dv = config.mlstm_v_width // NH
    in_proj = _linear(E, NH * (2 * dqk + 2 * dv + 2), bias=False)  # q | k | v | o | i | f, never a bias
    gates_and_norm = 2 * NH + NH * dv  # input/forget gate biases, per-head norm weight
    return in_proj + gates_and_norm + _linear(NH * dv, E, config.add_bias_linear)


def mlstm_v1_mixer_parameters(config: XLSTMConfig) -> int:
    E, NH, Di = config.hidden_size, config.num_attention_heads, config.mlstm_inner_size
    K, bs = config.conv_kernel_size, config.mlstm_qkv_block_size
    conv = Di * K + Di
    qkv = 3 * (Di // bs) * bs * bs
    gates = 3 * Di * NH * 2 + NH * 2  # Linear(cat[q, k, v] -> NH) for i and f, with bias
    skip_and_norm = 2 * Di
    bias = config.add_bias_linear
    return _linear(E, 2 * Di, bias) + conv + qkv + gates + skip_and_norm + _linear(Di, E, bias)


def slstm_mixer_parameters(config: XLSTMConfig) -> int:
    E, K = config.hidden_size, config.conv_kernel_size
    DH = E // config.slstm_heads
    conv = E * K + E
    gate_proj = 4 * E * DH  # i, f, z, o: NH block-diagonal DH x DH projections each
    recurrent = 4 * E * DH
    return conv + gate_proj + recurrent + 4 * E + E  # + gate biases (NH, 4, DH) + group norm weight


def attention_parameters(config: TransformerConfig) -> int:
    """Megatron `SelfAttention` of the local GPT layer spec (no q/k layernorm in that spec)."""
    E, kv = config.hidden_size, config.kv_channels
    q_size, kv_size = kv * config.num_attention_heads, kv * config.num_query_groups
    qkv = _linear(E, q_size + 2 * kv_size, config.add_bias_linear or config.add_qkv_bias)
    return qkv + _linear(q_size, E, config.add_bias_linear)


def layer_parameters(config: XLSTMConfig, symbol: str) -> int:
    """Parameters of one TransformerLayer built for pattern symbol `symbol`, norms included."""
    E = config.hidden_size
    if symbol == "m" and config.xlstm_block == "large":
        return E + mlstm_large_mixer_parameters(config) + E + mlp_parameters(config)
    if symbol == "m":
        return E + mlstm_v1_mixer_parameters(config)
    if symbol == "s":
        return E + slstm_mixer_parameters(config) + E + mlp_parameters(config)
    if symbol == "*":
        return E + attention_parameters(config) + E + mlp_parameters(config)
    raise ValueError(f"unknown layer symbol {symbol!r}")


LAYER_KEYS = {"m": "mlstm_layers", "s": "slstm_layers", "*": "attention_layers"}


def parameter_breakdown(config: XLSTMConfig, vocab_size: int, share_embeddings: bool = False) -> dict[str, int]:
    """Parameters per part: embedding, mlstm_layers, slstm_layers, attention_layers, final_norm, output_layer."""
    E = config.hidden_size
    parts = {"embedding": vocab_size * E, **dict.fromkeys(LAYER_KEYS.values(), 0)}
    for symbol in config.layer_pattern:
        parts[LAYER_KEYS[symbol]] += layer_parameters(config, symbol)
    parts["final_norm"] = E
    parts["output_layer"] = 0 if share_embeddings else vocab_size * E
    return parts


def count_parameters(config: XLSTMConfig, vocab_size: int, share_embeddings: bool = False) -> int:
    """Exact number of parameters of `XLSTMModel(config, vocab_size, share_embeddings_and_output_weights=...)`."""
    return sum(parameter_breakdown(config, vocab_size, share_embeddings).values())


# ---- the Transformer baseline (Megatron's GPTModel, `--model-family transformer`) ------------------------------


def _norm(config: TransformerConfig, width: int) -> int:
    return width * (2 if config.normalization == "LayerNorm" else 1)  # torch LayerNorm has a bias, RMSNorm none


def transformer_parameter_breakdown(config: TransformerConfig, vocab_size: int, share_embeddings: bool = False,
                                    learned_positions: int = 0) -> dict[str, int]:
    """Parameters per part of Megatron's GPTModel with the default (local or TE) layer spec: embedding (plus a
    learned position table of `learned_positions` rows; RoPE has none), attention_layers (input norm, attention with
    optional q/k norms, pre-MLP norm, MLP), final_norm, output_layer."""
    E = config.hidden_size
    qk_norms = 2 * _norm(config, config.kv_channels) if config.qk_layernorm else 0
    layer = _norm(config, E) + attention_parameters(config) + qk_norms + _norm(config, E) + mlp_parameters(config)
    return {
        "embedding": vocab_size * E + learned_positions * E,
        "attention_layers": config.num_layers * layer,
        "final_norm": _norm(config, E),
        "output_layer": 0 if share_embeddings else vocab_size * E,
    }


def count_transformer_parameters(config: TransformerConfig, vocab_size: int, share_embeddings: bool = False) -> int:
    return sum(transformer_parameter_breakdown(config, vocab_size, share_embeddings).values())


__all__ = [
    "count_parameters", "count_transformer_parameters", "layer_parameters", "parameter_breakdown",
    "transformer_parameter_breakdown",
]

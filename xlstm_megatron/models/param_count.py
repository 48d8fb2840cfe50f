"""Exact parameter count of an `XLSTMModel` from its config, in closed form (no model is built).

The count is the number of unique trainable scalars of the logical (TP=1) model, i.e. what
`sum(p.numel() for p in XLSTMModel(config, vocab_size).parameters())` gives at TP=1, PP=1:

- embedding: vocab x E word embeddings (no position embeddings: xLSTM models have none);
- per layer, its kind's closed form (`xlstm_megatron.layers.kinds`; the formulas are in `layers.costs` and
  `layers.mamba`), reported under the kind's part (mlstm_layers, slstm_layers, attention_layers, mamba_layers);
- final norm (E) and output layer (vocab x E, absent when embeddings are shared; Megatron's output layer has no bias).

All norms are weight-only (RMSNorm, and the v1 LayerNorm without bias). The Transformer Engine spec of the 'large'
family moves each input norm's weight into `TELayerNormColumnParallelLinear` (`layer_norm_weight`): the same count.
The padded vocabulary is the caller's: pass the model's vocab size (after padding), not the tokenizer's.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.layers.costs import (
    attention_parameters,
    mlp_parameters,
    mlstm_large_mixer_parameters,
    mlstm_v1_mixer_parameters,
    slstm_mixer_parameters,
)
from xlstm_megatron.layers.kinds import BREAKDOWN_KEYS, LAYER_KINDS, layer_kind


def layer_parameters(config: XLSTMConfig, symbol: str) -> int:
    """Parameters of one layer built for pattern symbol `symbol`, norms included."""
    return layer_kind(symbol, config.xlstm_block).parameters(config)


# symbol -> its part (kinds that share a symbol across families share the part)
LAYER_KEYS = {kind.symbol: kind.breakdown_key for kind in LAYER_KINDS}


def parameter_breakdown(config: XLSTMConfig, vocab_size: int, share_embeddings: bool = False) -> dict[str, int]:
    """Parameters per part: embedding, one part per layer kind (mlstm_layers, slstm_layers, attention_layers,
    mamba_layers), final_norm, output_layer."""
    E = config.hidden_size
    parts = {"embedding": vocab_size * E, **dict.fromkeys(BREAKDOWN_KEYS, 0)}
    for symbol in config.layer_pattern:
        kind = layer_kind(symbol, config.xlstm_block)
        parts[kind.breakdown_key] += kind.parameters(config)
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
    "LAYER_KEYS", "attention_parameters", "count_parameters", "count_transformer_parameters", "layer_parameters",
    "mlp_parameters", "mlstm_large_mixer_parameters", "mlstm_v1_mixer_parameters", "parameter_breakdown",
    "slstm_mixer_parameters", "transformer_parameter_breakdown",
]

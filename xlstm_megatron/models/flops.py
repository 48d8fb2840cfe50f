"""Model FLOPs of an xLSTM stack: matrix-multiply FLOPs (2 per multiply-add) of the forward pass, cells included.

Counts what the implementation multiplies: each layer by its kind's closed form (`xlstm_megatron.layers.kinds`:
projections, the depthwise convs, the mLSTM chunkwise cell, the sLSTM recurrence, attention, Mamba's SSD scan) and
the output layer. Norms, gates' element-wise math, the embedding lookup and the loss are left out
(they are O(E) per token against O(E^2)). A training step costs 3x the forward (backward = 2x forward), the usual
convention for MFU; activation recomputation is not counted. The Transformer baseline's count is at the end.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.layers.costs import attention_flops_per_token, mlp_flops_per_token, mlstm_cell_flops_per_token
from xlstm_megatron.layers.kinds import layer_kind


def layer_flops_per_token(config: XLSTMConfig, symbol: str, seq_length: int) -> int:
    """Forward FLOPs per token of one layer of pattern symbol `symbol` (its kind's closed form)."""
    return layer_kind(symbol, config.xlstm_block).flops_per_token(config, seq_length)


def forward_flops_per_token(config: XLSTMConfig, vocab_size: int, seq_length: int) -> int:
    layers = sum(layer_flops_per_token(config, s, seq_length) for s in config.layer_pattern)
    return layers + 2 * config.hidden_size * vocab_size


def train_flops_per_token(config: XLSTMConfig, vocab_size: int, seq_length: int) -> int:
    return 3 * forward_flops_per_token(config, vocab_size, seq_length)


# ---- the Transformer baseline (Megatron's GPTModel, `--model-family transformer`) ------------------------------


def transformer_forward_flops_per_token(config: TransformerConfig, vocab_size: int, seq_length: int,
                                        causal: bool = True) -> int:
    """Forward FLOPs per token of the baseline: per layer attention + (gated) MLP, then the output layer (norms,
    RoPE, softmax and the loss are O(E) per token and left out, as for the xLSTM stacks)."""
    layer = attention_flops_per_token(config, seq_length, causal) + mlp_flops_per_token(config)
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


__all__ = [
    "PEAK_TFLOPS", "attention_flops_per_token", "forward_flops_per_token", "layer_flops_per_token",
    "mlstm_cell_flops_per_token", "peak_tflops_per_device", "train_flops_per_token",
    "transformer_forward_flops_per_token", "transformer_train_flops_per_token",
]

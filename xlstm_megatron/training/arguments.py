"""xLSTM command-line flags for Megatron's argument parser.

Each flag's dest is the XLSTMConfig field of the same name, so Megatron's own
`core_transformer_config_from_args(args, config_class=XLSTMConfig)` fills them: use
`parse_args(extra_args_provider=add_xlstm_args)` in a Megatron-LM entry script, then
`gpt_config_from_args(args, config=core_transformer_config_from_args(args, config_class=XLSTMConfig))` with
`--spec xlstm_megatron.layers.specs xlstm_block_spec --position-embedding-type none`.
"""

from __future__ import annotations

import argparse

from xlstm_megatron.layers.config import XLSTMConfig

# (field, type, choices, help). Defaults are XLSTMConfig's; None means the family default of --xlstm-block.
XLSTM_FLAGS: list[tuple[str, type, tuple[str, ...] | None, str]] = [
    ("xlstm_pattern", str, None, "one symbol per layer: m mLSTM, s sLSTM (v1), * attention; default all m"),
    ("slstm_num_heads", int, None, "sLSTM heads (default: --num-attention-heads)"),
    ("mlstm_qk_dim_factor", float, None, "Large: q/k width as a fraction of the hidden size (0.5)"),
    ("mlstm_v_dim_factor", float, None, "Large: v width as a fraction of the hidden size (1.0)"),
    ("mlstm_qk_dim", int, None, "Large: total q/k width, overriding the factor"),
    ("mlstm_v_dim", int, None, "Large: total v width, overriding the factor"),
    ("mlstm_proj_factor", float, None, "v1: mLSTM up-projection factor (2.0)"),
    ("mlstm_qkv_block_size", int, None, "v1: block size of the q/k/v projections (4)"),
    ("conv_kernel_size", int, None, "v1: causal conv width (4)"),
    ("gate_soft_cap", float, None, "mLSTM gate soft cap, 0 = off (Large 15, v1 off)"),
    ("output_logit_soft_cap", float, None, "logit soft cap, 0 = off (Large 30, v1 off)"),
    ("ffn_proj_factor", float, None, "FFN width factor when --ffn-hidden-size is unset (Large 2.6667, v1 1.3)"),
    ("ffn_activation", str, ("silu", "gelu"), "gated-FFN activation (Large silu, v1 exact gelu)"),
    ("mlstm_chunk_size", int, None, "chunk length of the chunkwise mLSTM kernel (64)"),
    ("mlstm_backward", str, ("exact", "constant"), "mLSTM backward semantics (Large constant, v1 exact)"),
    ("mlstm_kernel", str, ("auto", "torch", "triton"), "chunkwise mLSTM implementation (auto: Triton on GPU)"),
    ("slstm_kernel", str, ("auto", "torch", "triton"), "sLSTM implementation (auto: fused Triton on GPU)"),
    ("mlstm_eps", float, None, "mLSTM normaliser eps (1e-6)"),
    ("head_norm_eps", float, None, "eps of the per-head output norm (Large 1e-6, v1 1e-5)"),
    ("slstm_forget_gate", str, ("sigmoid", "exp"), "sLSTM forget gate (sigmoid)"),
]
_DATACLASS_DEFAULTS = {f: XLSTMConfig.__dataclass_fields__[f].default for f, *_ in XLSTM_FLAGS}


def add_xlstm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("xLSTM")
    group.add_argument("--xlstm-block", dest="xlstm_block", choices=("large", "v1"), default="large",
                       help="block family: xLSTM-7B 'large' or the NeurIPS 2024 'v1' blocks")
    for name, typ, choices, help_text in XLSTM_FLAGS:
        group.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=typ, choices=choices, default=_DATACLASS_DEFAULTS[name],
            help=help_text,
        )
    return parser

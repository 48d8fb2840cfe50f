"""The one registry of layer kinds: what each `xlstm_pattern` symbol builds and costs.

Like Megatron-Core's `hybrid_layer_allocation.Symbols`, one table of symbols; unlike it, each entry also carries its
spec builder and closed forms, so the spec, the parameter count, the FLOP count, FP8 validation and the pattern
checks all read the same entry. A symbol may name one kind per xLSTM block family ('m' is the Large mLSTM in "large"
and the v1 mLSTM in "v1"). Adding a kind is adding one entry here (plus its module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron.core.transformer.spec_utils import ModuleSpec

from xlstm_megatron.layers import costs, kind_specs, mamba
from xlstm_megatron.layers.config import XLSTMConfig
from xlstm_megatron.layers.slstm_v1 import SLSTM_NO_CONTEXT_PARALLEL


@dataclass(frozen=True)
class LayerKind:
    symbol: str
    name: str
    """Readable name, used in messages ("mLSTM layers ('m') ...")."""
    families: tuple[str, ...]
    """The `xlstm_block` families that allow it."""
    spec: Callable[[XLSTMConfig, bool], ModuleSpec]
    """(config, use_te) -> the layer's ModuleSpec."""
    parameters: Callable[[XLSTMConfig], int]
    """Exact parameters of one layer at TP=1, norms included."""
    flops_per_token: Callable[[XLSTMConfig, int], int]
    """(config, seq_length) -> forward matrix-multiply FLOPs per token."""
    fp8_gemm_shapes: Callable[[XLSTMConfig], dict[str, tuple[int, int]]]
    """(rows, columns) per TP rank of each weight that runs as an FP8 GEMM under TE."""
    breakdown_key: str
    """Its part in `parameter_breakdown`."""
    recompute_module: str | None = None
    """The `recompute_modules` name that checkpoints its cell, if any."""
    validate: Callable[[XLSTMConfig], None] | None = None
    """Extra config checks when the pattern has it (one-line ValueErrors)."""
    context_parallel_refusal: Callable[[XLSTMConfig], str | None] | None = None
    """Why it cannot run under context parallelism with this config (None, or a None result: it can)."""


LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind("m", "mLSTM", ("large",), kind_specs.mlstm_large_spec, costs.mlstm_large_layer_parameters,
              costs.mlstm_large_layer_flops, costs.mlstm_large_fp8_shapes, "mlstm_layers", "mlstm_cell"),
    LayerKind("m", "mLSTM", ("v1",), kind_specs.mlstm_v1_spec, costs.mlstm_v1_layer_parameters,
              costs.mlstm_v1_layer_flops, costs.mlstm_v1_fp8_shapes, "mlstm_layers", "mlstm_cell"),
    LayerKind("s", "sLSTM", ("v1",), kind_specs.slstm_spec, costs.slstm_layer_parameters, costs.slstm_layer_flops,
              costs.slstm_fp8_shapes, "slstm_layers", "slstm_cell", costs.validate_slstm,
              lambda _: SLSTM_NO_CONTEXT_PARALLEL),
    LayerKind("*", "attention", ("large", "v1"), kind_specs.attention_spec, costs.attention_layer_parameters,
              costs.attention_layer_flops, costs.attention_fp8_shapes, "attention_layers",
              context_parallel_refusal=lambda c: None if c.transformer_impl == "transformer_engine" else (
                  "attention layers ('*') have context parallelism only in Transformer Engine's attention (Megatron's "
                  "local one has none); use --transformer-impl transformer_engine or a pattern without '*'")),
    LayerKind("M", "Mamba", ("large", "v1"), mamba.mamba_spec, mamba.mamba_layer_parameters,
              mamba.mamba_layer_flops, mamba.mamba_fp8_shapes, "mamba_layers", validate=mamba.validate_mamba),
)

LAYER_SYMBOLS: dict[str, str] = {k.symbol: k.name for k in LAYER_KINDS}
BREAKDOWN_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k.breakdown_key for k in LAYER_KINDS))


def layer_kind(symbol: str, family: str) -> LayerKind:
    """The kind `symbol` builds in the `family` block family."""
    for kind in LAYER_KINDS:
        if kind.symbol == symbol and family in kind.families:
            return kind
    named = [k for k in LAYER_KINDS if k.symbol == symbol]
    if not named:
        raise ValueError(f"unknown layer symbol {symbol!r}; use one of {LAYER_SYMBOLS}")
    families = sorted({f for k in named for f in k.families})
    raise ValueError(f"{named[0].name} layers ({symbol!r}) exist only in the {' and '.join(families)} family; "
                     f"set xlstm_block={families[0]!r} or drop them")


def pattern_kinds(config: XLSTMConfig) -> list[LayerKind]:
    """The distinct kinds of the config's pattern, in registry order."""
    return [k for k in LAYER_KINDS
            if config.xlstm_block in k.families and k.symbol in config.layer_pattern]


def validate_pattern(config: XLSTMConfig) -> None:
    """Every symbol is known and allowed in the family; then each kind's own checks."""
    pattern = config.layer_pattern
    unknown = sorted(set(pattern) - set(LAYER_SYMBOLS))
    if unknown:
        raise ValueError(f"xlstm_pattern has unknown symbols {unknown}; use {LAYER_SYMBOLS}")
    for symbol in dict.fromkeys(pattern):
        layer_kind(symbol, config.xlstm_block)


def validate_kinds(config: XLSTMConfig) -> None:
    for kind in pattern_kinds(config):
        if kind.validate is not None:
            kind.validate(config)


def check_context_parallel(config: XLSTMConfig, cp_size: int) -> None:
    """One-line ValueError (the reason alone) for the first kind of the pattern that cannot run at `cp_size` > 1."""
    if cp_size == 1:
        return
    for kind in pattern_kinds(config):
        why = None if kind.context_parallel_refusal is None else kind.context_parallel_refusal(config)
        if why:
            raise ValueError(why)


def fp8_gemm_shapes(config: XLSTMConfig) -> dict[str, tuple[int, int]]:
    """Union over the pattern's kinds (kinds that share a module, e.g. the MLP, give the same shape)."""
    shapes: dict[str, tuple[int, int]] = {}
    for kind in pattern_kinds(config):
        shapes.update(kind.fp8_gemm_shapes(config))
    return shapes


__all__ = [
    "BREAKDOWN_KEYS", "LAYER_KINDS", "LAYER_SYMBOLS", "LayerKind", "check_context_parallel", "fp8_gemm_shapes",
    "layer_kind", "pattern_kinds", "validate_kinds", "validate_pattern",
]

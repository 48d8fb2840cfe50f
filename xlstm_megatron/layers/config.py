"""`XLSTMConfig`: Megatron's TransformerConfig plus the validated xLSTM fields.

Being a TransformerConfig subclass lets Megatron fill it from parsed arguments
(`core_transformer_config_from_args(args, config_class=XLSTMConfig)`) and pass it unchanged to GPTModel, the
TransformerBlock and every mixer. Every check raises a one-line ValueError that names the fix, at construction.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from xlstm_megatron.ops.init import normal_init_method, small_init_std, wang_init_std

BlockFamily = Literal["large", "v1"]


def _round_up(x: float, multiple: int) -> int:
    """v1's rounding: ceil(x / multiple) * multiple."""
    return int(math.ceil(x / multiple) * multiple)


def _round_up_large(x: float, multiple: int) -> int:
    """xLSTM-Large's rounding, (x + multiple - 1) // multiple * multiple on a float: 2.6667 * 96 gives 256, not 320."""
    return int((x + multiple - 1) // multiple * multiple)


@functools.cache
def have_transformer_engine() -> bool:
    """Whether Transformer Engine imports here (Megatron's TE extension module imports without it)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def pattern_from_positions(num_layers: int, slstm_at: list[int] | tuple[int, ...]) -> str:
    """The paper's xLSTM[a:b] layouts as a pattern: sLSTM at the given 0-based block indices, mLSTM elsewhere."""
    bad = [i for i in slstm_at if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"sLSTM positions {bad} are outside 0..{num_layers - 1}; fix slstm_at or num_layers")
    return "".join("s" if i in set(slstm_at) else "m" for i in range(num_layers))


# Megatron-side settings of the official models; `make_xlstm_config` applies those the caller leaves out. (From
# parsed arguments they come from Megatron's own flags: --normalization, --norm-epsilon, --swiglu, ...)
MEGATRON_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "large": dict(normalization="RMSNorm", layernorm_epsilon=1e-6),
    "v1": dict(normalization="LayerNorm", layernorm_epsilon=1e-5),
}
# xLSTM fields left at None take these (a soft cap of 0 switches it off).
XLSTM_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "large": dict(ffn_proj_factor=2.6667, ffn_activation="silu", gate_soft_cap=15.0, output_logit_soft_cap=30.0,
                  mlstm_backward="constant", head_norm_eps=1e-6),
    "v1": dict(ffn_proj_factor=1.3, ffn_activation="gelu", gate_soft_cap=0.0, output_logit_soft_cap=0.0,
               mlstm_backward="exact", head_norm_eps=1e-5),
}
FFN_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
# Names of `recompute_modules` (`--recompute-granularity selective --recompute-modules ...`) that the xLSTM mixers
# honour, next to Megatron's own ("mlp", "layernorm", and "core_attn" for '*' layers). Each checkpoints only the cell:
# its inputs are kept, its internal activations are recomputed in backward.
XLSTM_RECOMPUTE_MODULES: dict[str, str] = {
    "mlstm_cell": "the chunkwise mLSTM cell (Large and v1): q, k, v and the gates are kept, the cell's per-chunk "
                  "states and normalisers are recomputed",
    "slstm_cell": "the sLSTM gate projections W x and the recurrence (v1): the block's input and conv output are "
                  "kept, the per-step gate pre-activations and states are recomputed",
}
# Settings every xLSTM model shares: no biases in the big projections, no dropout.
COMMON_DEFAULTS: dict[str, Any] = dict(add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)


@dataclass
class XLSTMConfig(TransformerConfig):
    """TransformerConfig with xLSTM fields. Fields documented "family default" take the official value of
    `xlstm_block` when left at None.

    `num_attention_heads` is the mLSTM head count (and the attention head count of '*' layers).
    """

    xlstm_block: BlockFamily = "large"
    """'large': the xLSTM-7B block (mLSTM mixer + SwiGLU MLP in every layer). 'v1': the NeurIPS 2024 blocks."""

    xlstm_pattern: str | None = None
    """One symbol per layer: 'm' mLSTM, 's' sLSTM (v1 only), '*' attention, 'M' Mamba (needs mamba_ssm); the table
    is `xlstm_megatron.layers.kinds`. None: all mLSTM."""

    slstm_num_heads: int | None = None
    """sLSTM heads (v1); None: num_attention_heads."""

    mlstm_qk_dim_factor: float = 0.5
    """Large: q/k width = factor * hidden_size."""
    mlstm_v_dim_factor: float = 1.0
    """Large: v width = factor * hidden_size."""
    mlstm_qk_dim: int | None = None
    """Large: total q/k width, overriding the factor (HF's xLSTM rounds it up to a multiple of 64)."""
    mlstm_v_dim: int | None = None
    """Large: total v width, overriding the factor."""
    mlstm_proj_factor: float = 2.0
    """v1: mLSTM up-projection width = round_up(factor * hidden_size, 64)."""
    mlstm_qkv_block_size: int = 4
    """v1: block size of the block-diagonal q/k/v projections."""
    conv_kernel_size: int = 4
    """v1: causal depthwise conv width (mLSTM and sLSTM)."""

    gate_soft_cap: float | None = None
    """mLSTM input/forget gate pre-activations are soft-capped at this value; 0: off. Family default (15 / off)."""
    output_logit_soft_cap: float | None = None
    """Logits soft cap; 0: off. Family default (30 / off)."""
    ffn_proj_factor: float | None = None
    """ffn_hidden_size = round_up(factor * hidden_size, 64) when ffn_hidden_size is not given. Family default."""
    ffn_activation: Literal["silu", "gelu"] | None = None
    """Activation of the gated FFN (always gated): Large SwiGLU ('silu'), v1 exact-GELU GLU ('gelu'). Family default.
    Overrides Megatron's activation flags, which cannot express an exact-GELU GLU."""

    mlstm_chunk_size: int = 64
    mlstm_kernel: Literal["auto", "torch", "triton"] = "auto"
    """Chunkwise mLSTM implementation: 'auto' = the Triton kernels on CUDA, torch elsewhere."""
    slstm_kernel: Literal["auto", "torch", "triton"] = "auto"
    """sLSTM implementation: 'auto' = the fused Triton kernel on CUDA (head size <= 128), torch elsewhere."""
    mlstm_backward: Literal["exact", "constant"] | None = None
    """'constant': normaliser and stabiliser are constants in backward (as xLSTM-7B was trained); 'exact': autograd
    through them (as the v1 code). Family default."""
    mlstm_eps: float = 1e-6
    head_norm_eps: float | None = None
    """eps of the per-head output norm. Family default (1e-6 / 1e-5)."""
    slstm_forget_gate: Literal["sigmoid", "exp"] = "sigmoid"

    init_method_std: float | None = None
    """Std of the input-side projections and the embedding (TransformerConfig's field, redeclared so that "not given"
    is visible): None takes the official small-init std sqrt(2 / (5 hidden_size)); a number is kept as given."""

    def __post_init__(self) -> None:
        if self.xlstm_block not in XLSTM_FAMILY_DEFAULTS:
            raise ValueError(f"xlstm_block={self.xlstm_block!r} is unknown; use 'large' or 'v1'")
        for name, value in XLSTM_FAMILY_DEFAULTS[self.xlstm_block].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.ffn_activation not in FFN_ACTIVATIONS:
            raise ValueError(f"ffn_activation={self.ffn_activation!r} is unknown; use one of {sorted(FFN_ACTIVATIONS)}")
        self.gated_linear_unit, self.activation_func = True, FFN_ACTIVATIONS[self.ffn_activation]
        if self.ffn_activation == "gelu":
            # Megatron's fused bias-GELU/GEGLU kernels use the tanh approximation; the family's GELU is exact.
            self.bias_activation_fusion = False
        # Per-layer checkpoint keys: Megatron otherwise stacks same-named layer tensors along a layer axis, which
        # breaks for mixed mLSTM/sLSTM stacks whose mixers share parameter names with different shapes.
        self.hetereogenous_dist_checkpoint = True
        if self.ffn_hidden_size is None:
            round_up = _round_up_large if self.xlstm_block == "large" else _round_up
            self.ffn_hidden_size = round_up(self.ffn_proj_factor * self.hidden_size, 64)
        # Official inits: small-init for input-side projections and embeddings, Wang-init for output projections.
        if self.init_method_std is None:
            self.init_method_std = small_init_std(self.hidden_size)
        if self.init_method is None:
            self.init_method = normal_init_method(self.init_method_std)
        if self.output_layer_init_method is None:
            self.output_layer_init_method = normal_init_method(wang_init_std(self.hidden_size, self.num_layers))
        # TransformerConfig asserts that recompute_modules names only Megatron's modules and has no registry, so the
        # xLSTM names are taken out for its check and put back after (idempotent if __post_init__ runs again).
        ours = [m for m in (self.recompute_modules or []) if m in XLSTM_RECOMPUTE_MODULES]
        if ours:
            self.recompute_modules = [m for m in self.recompute_modules if m not in XLSTM_RECOMPUTE_MODULES]
        super().__post_init__()
        if ours:
            self.recompute_modules = [*self.recompute_modules, *ours]
        self.validate_xlstm()

    # ---- derived sizes ------------------------------------------------------------------------------------------
    @property
    def layer_pattern(self) -> str:
        return self.xlstm_pattern if self.xlstm_pattern is not None else "m" * self.num_layers

    @property
    def mlstm_qk_width(self) -> int:
        """Large: total q/k width over all heads."""
        return self.mlstm_qk_dim or int(self.mlstm_qk_dim_factor * self.hidden_size)

    @property
    def mlstm_v_width(self) -> int:
        """Large: total v width over all heads."""
        return self.mlstm_v_dim or int(self.mlstm_v_dim_factor * self.hidden_size)

    @property
    def mlstm_inner_size(self) -> int:
        """v1 up-projection width."""
        return _round_up(self.mlstm_proj_factor * self.hidden_size, 64)

    @property
    def slstm_heads(self) -> int:
        return self.slstm_num_heads or self.num_attention_heads

    @property
    def num_xlstm_blocks(self) -> int:
        return len(self.layer_pattern)

    # ---- validation ---------------------------------------------------------------------------------------------
    def validate_xlstm(self) -> None:
        # the kinds' modules import this one, hence the late import
        from xlstm_megatron.layers.kinds import validate_kinds, validate_pattern

        tp = self.tensor_model_parallel_size
        heads = self.num_attention_heads
        pattern = self.layer_pattern
        if len(pattern) != self.num_layers:
            raise ValueError(
                f"xlstm_pattern has {len(pattern)} symbols but num_layers={self.num_layers}; give one symbol per layer"
            )
        validate_pattern(self)
        if heads % tp:
            raise ValueError(f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tp}")
        validate_kinds(self)
        if self.xlstm_block == "large":
            for name, explicit, factor in (("mlstm_qk", self.mlstm_qk_dim, self.mlstm_qk_dim_factor),
                                           ("mlstm_v", self.mlstm_v_dim, self.mlstm_v_dim_factor)):
                width = explicit if explicit is not None else factor * self.hidden_size
                if width != int(width) or int(width) % heads or width <= 0:
                    raise ValueError(
                        f"{name} width {width:g} ({name}_dim, or {name}_dim_factor x hidden_size) must be a positive "
                        f"integer divisible by num_attention_heads={heads}"
                    )
        else:
            inner, bs = self.mlstm_inner_size, self.mlstm_qkv_block_size
            if inner % heads or (inner // heads) % bs:
                raise ValueError(
                    f"mLSTM inner size {inner} must split into {heads} heads whose size is a multiple of "
                    f"mlstm_qkv_block_size={bs}; change hidden_size, mlstm_proj_factor or num_attention_heads"
                )
        if self.mlstm_backward not in ("exact", "constant"):
            raise ValueError(f"mlstm_backward={self.mlstm_backward!r} is unknown; use 'exact' or 'constant'")
        for name in ("mlstm_kernel", "slstm_kernel"):
            kernel = getattr(self, name)
            if kernel not in ("auto", "torch", "triton"):
                raise ValueError(f"{name}={kernel!r} is unknown; use 'auto', 'torch' or 'triton'")
            if kernel == "triton" and not torch.cuda.is_available():
                raise ValueError(f"{name}='triton' needs a CUDA GPU; use 'auto' (Triton on GPU, torch on CPU)")
        if self.slstm_forget_gate not in ("sigmoid", "exp"):
            raise ValueError(f"slstm_forget_gate={self.slstm_forget_gate!r} is unknown; use 'sigmoid' or 'exp'")
        if self.mlstm_chunk_size < 1:
            raise ValueError(f"mlstm_chunk_size={self.mlstm_chunk_size} must be >= 1")
        self._validate_recompute_modules()
        if self.fp8:
            self.validate_fp8()
        if self.tp_comm_overlap:
            # TE's userbuffer overlap knows only Megatron's own layers' buffers (qkv, proj, fc1, fc2)
            raise ValueError("tp_comm_overlap is not supported by the xLSTM mixers; drop tp_comm_overlap")
        pp = self.pipeline_model_parallel_size
        if pp > 1 and self.pipeline_model_parallel_layout is None and self.num_layers_in_first_pipeline_stage is None \
                and self.num_layers_in_last_pipeline_stage is None:
            vp = self.virtual_pipeline_model_parallel_size or 1
            if self.num_layers % (pp * vp):
                raise ValueError(
                    f"num_layers={self.num_layers} cannot be split evenly over pipeline_model_parallel_size={pp}"
                    f" x virtual stages={vp}; change num_layers or use num_layers_in_first/last_pipeline_stage"
                )

    def _validate_recompute_modules(self) -> None:
        """The xLSTM names of `recompute_modules` need selective granularity and a layer that has the cell (as
        Megatron refuses "mla_up_proj" without MLA): a name that would do nothing is an error, not a silent no-op."""
        ours = [m for m in self.recompute_modules or [] if m in XLSTM_RECOMPUTE_MODULES]
        if ours and self.recompute_granularity != "selective":
            raise ValueError(f"recompute_modules {ours} act only with recompute_granularity='selective' "
                             f"(it is {self.recompute_granularity!r}); set --recompute-granularity selective")
        from xlstm_megatron.layers.kinds import LAYER_KINDS, pattern_kinds

        present = {k.recompute_module for k in pattern_kinds(self)}
        for module in ours:
            if module not in present:
                kind = next(k for k in LAYER_KINDS if k.recompute_module == module)
                raise ValueError(f"recompute_modules has {module!r} but xlstm_pattern has no {kind.name} layer "
                                 f"({kind.symbol!r}); drop it")

    def recomputes(self, module: str) -> bool:
        """Whether selective recompute of `module` (an XLSTM_RECOMPUTE_MODULES name) is on."""
        return self.recompute_granularity == "selective" and module in (self.recompute_modules or [])

    def fp8_gemm_shapes(self) -> dict[str, tuple[int, int]]:
        """(rows, columns) on one TP rank of every weight that runs as an FP8 GEMM (the TE linears of the pattern's
        layer kinds; the cells, norms, v1's block-diagonal q/k/v and gate projections and the sLSTM stay in bf16)."""
        from xlstm_megatron.layers.kinds import fp8_gemm_shapes

        return fp8_gemm_shapes(self)

    def validate_fp8(self) -> None:
        """FP8 runs in Transformer Engine's linears, whose FP8 GEMMs need weight rows divisible by 8 and columns by 16
        (both by 32 for MXFP8's blocks)."""
        if self.fp8 not in ("e4m3", "hybrid"):
            raise ValueError(f"fp8={self.fp8!r} is unknown; use 'e4m3' or 'hybrid' (e4m3 forward, e5m2 gradients)")
        rows_div, cols_div = (32, 32) if self.fp8_recipe == "mxfp8" else (8, 16)
        for name, (rows, cols) in self.fp8_gemm_shapes().items():
            if rows % rows_div or cols % cols_div:
                raise ValueError(
                    f"fp8: the {name} weight is {rows} x {cols} per TP rank, but FP8 GEMMs ({self.fp8_recipe} recipe) "
                    f"need rows divisible by {rows_div} and columns by {cols_div}; change hidden_size, the head sizes "
                    "or tensor_model_parallel_size, or drop fp8"
                )
        if self.transformer_impl != "transformer_engine":
            raise ValueError(
                f"fp8 runs in Transformer Engine linears, but transformer_impl={self.transformer_impl!r}; "
                "set transformer_impl='transformer_engine' or drop fp8"
            )
        if not have_transformer_engine():
            raise ValueError(
                "fp8 needs Transformer Engine, which does not import here; install it (pip install "
                "'xlstm-megatron[te]') or drop fp8"
            )


_FIELD_NAMES = {f.name for f in fields(XLSTMConfig)}


def make_xlstm_config(xlstm_block: BlockFamily = "large", **kwargs: Any) -> XLSTMConfig:
    """An XLSTMConfig with the official family defaults for every field the caller leaves out."""
    if xlstm_block not in MEGATRON_FAMILY_DEFAULTS:
        raise ValueError(f"xlstm_block={xlstm_block!r} is unknown; use 'large' or 'v1'")
    unknown = sorted(set(kwargs) - _FIELD_NAMES)
    if unknown:
        raise ValueError(f"unknown XLSTMConfig fields {unknown}; check the spelling")
    merged = {**COMMON_DEFAULTS, **MEGATRON_FAMILY_DEFAULTS[xlstm_block], **kwargs}
    return XLSTMConfig(xlstm_block=xlstm_block, **merged)

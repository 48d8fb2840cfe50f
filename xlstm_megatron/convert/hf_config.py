"""Hugging Face `xLSTMConfig` (config.json of `xLSTMForCausalLM`) <-> our model settings.

Import maps every field that changes what the model computes and refuses values our model cannot express:
    vocab_size -> vocab; hidden_size = embedding_dim -> hidden_size; num_hidden_layers = num_blocks -> num_layers;
    num_heads -> num_attention_heads; qk_dim_factor, v_dim_factor -> mlstm_qk_dim, mlstm_v_dim (int(E x factor));
    ffn_proj_factor, ffn_round_up_to_multiple_of -> ffn_hidden_size (HF's rounding); norm_eps -> layernorm_epsilon
    and head_norm_eps; eps -> mlstm_eps; gate_soft_cap, output_logit_soft_cap -> same (None: 0, off);
    chunk_size -> mlstm_chunk_size; chunkwise_kernel -> mlstm_backward ('exact' for *native_autograd, whose backward
    differentiates the normaliser; 'constant' for the custom-backward/Triton kernels); weight_mode selects the tensor
    names. Refused: use_bias=True, add_out_norm=False, tie_word_embeddings=True, another model_type.
The rest does not change the function (sequence/step kernels, mode, autocast/inference state dtypes,
return_last_states, use_cache, max_inference_chunksize, token ids; norm_reduction_force_float32: our norms always
reduce in fp32) and is kept verbatim in the checkpoint's `extra`, so exporting the model again restores it.

Widths: HF builds q/k and v with `int(hidden_size * factor)` rows. Its `config.qk_dim` / `config.v_dim` properties
round up to a multiple of 64, but only its generation cache uses them; the weights (and so ours) follow the former.
"""

from __future__ import annotations

import math
from typing import Any

from xlstm_megatron.convert.errors import ConvertError
from xlstm_megatron.convert.large_map import LargeSizes, WeightMode

# HF's own defaults (transformers 5.x `xLSTMConfig`), for fields a config.json leaves out.
HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=50304, hidden_size=4096, num_hidden_layers=32, num_heads=8, use_bias=False,
    norm_reduction_force_float32=True, tie_word_embeddings=False, add_out_norm=True, norm_eps=1e-6,
    qk_dim_factor=0.5, v_dim_factor=1.0, chunkwise_kernel="chunkwise--native_autograd",
    sequence_kernel="native_sequence__native", step_kernel="native", mode="inference", chunk_size=64,
    return_last_states=True, autocast_kernel_dtype="bfloat16", eps=1e-6, inference_state_dtype="float32",
    ffn_proj_factor=2.667, ffn_round_up_to_multiple_of=64, gate_soft_cap=15.0, output_logit_soft_cap=30.0,
    weight_mode="single", use_cache=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    max_inference_chunksize=16384,
)
# Kernels whose backward treats the mLSTM normaliser and stabiliser as constants (`mlstm_backward='constant'`).
EXACT_BACKWARD_KERNELS = ("native_autograd",)


def hf_round_up(x: float, multiple: int) -> int:
    """HF's `round_up_to_next_multiple_of` (on floats: 2.667 * 96 = 256.03 gives 256)."""
    return int(((x + multiple - 1) // multiple) * multiple)


def _get(hf: dict[str, Any], key: str) -> Any:
    value = hf.get(key)
    return HF_DEFAULTS[key] if value is None and key in HF_DEFAULTS else value


def _pair(hf: dict[str, Any], a: str, b: str) -> int:
    """HF's aliases (hidden_size/embedding_dim, num_hidden_layers/num_blocks) must agree."""
    va, vb = hf.get(a), hf.get(b)
    if va is not None and vb is not None and va != vb:
        raise ConvertError(f"config.json has {a}={va} but {b}={vb}; xLSTMForCausalLM needs them equal")
    value = va if va is not None else vb if vb is not None else HF_DEFAULTS[a]
    if not isinstance(value, int) or value <= 0:
        raise ConvertError(f"config.json {a}={value!r} must be a positive integer")
    return value


def hf_sizes(hf: dict[str, Any]) -> tuple[LargeSizes, WeightMode]:
    """Tensor widths and weight mode an HF config implies (checked against the shards' shapes by the importer)."""
    E = _pair(hf, "hidden_size", "embedding_dim")
    ffn = hf_round_up(E * _get(hf, "ffn_proj_factor"), _get(hf, "ffn_round_up_to_multiple_of"))
    sizes = LargeSizes(
        vocab_size=_get(hf, "vocab_size"), hidden_size=E, num_blocks=_pair(hf, "num_hidden_layers", "num_blocks"),
        num_heads=_get(hf, "num_heads"), qk_width=int(E * _get(hf, "qk_dim_factor")),
        v_width=int(E * _get(hf, "v_dim_factor")), ffn_hidden_size=ffn,
    )
    return sizes, _get(hf, "weight_mode")


def model_kwargs_from_hf(hf: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(make_xlstm_config kwargs of family 'large', vocab size) for an HF xLSTM config.json; ConvertError if our
    model cannot compute the same function."""
    if hf.get("model_type") != "xlstm":
        raise ConvertError(
            f"config.json has model_type={hf.get('model_type')!r}; only Hugging Face xLSTM models ('xlstm') convert"
        )
    refuse = {
        "use_bias": (True, "biases in the projections and norms"),
        "add_out_norm": (False, "no final norm"),
        "tie_word_embeddings": (True, "tied embedding and output weights"),
    }
    for key, (bad, what) in refuse.items():
        if _get(hf, key) == bad:
            raise ConvertError(f"config.json has {key}={bad} ({what}), which our xLSTM-Large does not support")
    mode = _get(hf, "weight_mode")
    if mode not in ("single", "fused"):
        raise ConvertError(f"config.json has weight_mode={mode!r}; use 'single' or 'fused'")
    sizes, _ = hf_sizes(hf)
    caps = {}
    for key in ("gate_soft_cap", "output_logit_soft_cap"):
        cap = hf.get(key, HF_DEFAULTS[key])  # None (older configs): no cap, our 0
        caps[key] = float(cap or 0.0)
    kernel = str(_get(hf, "chunkwise_kernel"))
    kwargs: dict[str, Any] = dict(
        num_layers=sizes.num_blocks, hidden_size=sizes.hidden_size, num_attention_heads=sizes.num_heads,
        mlstm_qk_dim=sizes.qk_width, mlstm_v_dim=sizes.v_width,
        ffn_hidden_size=sizes.ffn_hidden_size, ffn_proj_factor=float(_get(hf, "ffn_proj_factor")),
        ffn_activation="silu", layernorm_epsilon=float(_get(hf, "norm_eps")), head_norm_eps=float(_get(hf, "norm_eps")),
        mlstm_eps=float(_get(hf, "eps")), mlstm_chunk_size=int(_get(hf, "chunk_size")),
        mlstm_backward="exact" if any(k in kernel for k in EXACT_BACKWARD_KERNELS) else "constant",
        **caps,
    )
    return kwargs, sizes.vocab_size


def _factor_for(width: int, hidden: int, keep: float | None) -> float:
    """A factor f with int(hidden * f) == width (HF's formula): `keep` (the imported config's) if it gives width,
    else the plain ratio, nudged up past float rounding."""
    if keep is not None and int(hidden * keep) == width:
        return keep
    f = width / hidden
    while int(hidden * f) < width:
        f = math.nextafter(f, math.inf)
    return f


def _ffn_fields(ffn: int, hidden: int, candidates: list[tuple[float, int]]) -> dict[str, Any]:
    """ffn_proj_factor / ffn_round_up_to_multiple_of that make HF build `ffn` rows: the first candidate that does,
    else a factor in the middle of the interval HF's rounding maps to `ffn`."""
    for factor, multiple in candidates:
        if multiple > 0 and hf_round_up(hidden * factor, multiple) == ffn:
            return dict(ffn_proj_factor=factor, ffn_round_up_to_multiple_of=multiple)
    multiple = math.gcd(ffn, 64)
    # hf_round_up(x, m) == ffn for x in [ffn - m + 1, ffn + 1)
    factor = (ffn + 1 - multiple / 2) / hidden
    if hf_round_up(hidden * factor, multiple) != ffn:  # pragma: no cover - the interval is at least 0.5 wide
        raise ConvertError(f"cannot express ffn_hidden_size={ffn} in HF's ffn_proj_factor")
    return dict(ffn_proj_factor=factor, ffn_round_up_to_multiple_of=multiple)


def hf_config_from_model(config: Any, vocab_size: int, base: dict[str, Any] | None) -> dict[str, Any]:
    """config.json for `xLSTMForCausalLM` holding our Large model `config` (an XLSTMConfig). `base` is the HF config
    the model was imported from (its runtime fields are kept) or None (HF's defaults)."""
    if config.xlstm_block != "large" or set(config.layer_pattern) != {"m"}:
        raise ConvertError(
            f"Hugging Face xLSTMForCausalLM holds xLSTM-Large mLSTM stacks only; this checkpoint is "
            f"xlstm_block={config.xlstm_block!r} with pattern {config.layer_pattern!r}"
        )
    if config.layernorm_epsilon != config.head_norm_eps:
        raise ConvertError(
            f"HF has one norm_eps for RMSNorm and head norm; this model has layernorm_epsilon="
            f"{config.layernorm_epsilon} and head_norm_eps={config.head_norm_eps}"
        )
    uncapped = [k for k in ("gate_soft_cap", "output_logit_soft_cap") if not getattr(config, k)]
    if uncapped:
        raise ConvertError(f"HF xLSTM always soft-caps gates and logits; this model has {uncapped[0]}=0")
    if config.ffn_activation != "silu" or config.normalization != "RMSNorm" or config.add_bias_linear:
        raise ConvertError("HF xLSTM needs the SwiGLU FFN, RMSNorm and no linear biases; this model differs")
    E = config.hidden_size
    out = {k: v for k, v in (base or {}).items() if k not in ("embedding_dim", "num_blocks")}
    for key, value in HF_DEFAULTS.items():
        out.setdefault(key, value)
    ffn_candidates = [(config.ffn_proj_factor, 64)]
    if base:
        ffn_candidates.insert(0, (out["ffn_proj_factor"], out["ffn_round_up_to_multiple_of"]))
    kernel = str(out["chunkwise_kernel"])
    if config.mlstm_backward == "exact" and not any(k in kernel for k in EXACT_BACKWARD_KERNELS):
        out["chunkwise_kernel"] = HF_DEFAULTS["chunkwise_kernel"]
    out.update(
        model_type="xlstm", architectures=["xLSTMForCausalLM"], vocab_size=vocab_size, hidden_size=E,
        embedding_dim=E, num_hidden_layers=config.num_layers, num_blocks=config.num_layers,
        num_heads=config.num_attention_heads, use_bias=False, add_out_norm=True, tie_word_embeddings=False,
        norm_eps=config.layernorm_epsilon, eps=config.mlstm_eps, chunk_size=config.mlstm_chunk_size,
        qk_dim_factor=_factor_for(config.mlstm_qk_width, E, (base or {}).get("qk_dim_factor")),
        v_dim_factor=_factor_for(config.mlstm_v_width, E, (base or {}).get("v_dim_factor")),
        gate_soft_cap=float(config.gate_soft_cap), output_logit_soft_cap=float(config.output_logit_soft_cap),
        **_ffn_fields(config.ffn_hidden_size, E, ffn_candidates),
    )
    return out

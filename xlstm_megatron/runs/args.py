"""Megatron arguments for xLSTM runs: the plugin flags, the family's architecture, YAML configs as flags.

Each plugin flag's dest is the XLSTMConfig field of the same name, so Megatron's own
`core_transformer_config_from_args(args, config_class=XLSTMConfig)` fills them.

Megatron's argument defaults are GPT-2's (LayerNorm, biases, dropout 0.1, tied embeddings, init std 0.02, FFN 4·E),
and `validate_args` fills `ffn_hidden_size` before any config class sees it. An xLSTM run therefore goes
`parse_xlstm_args(argv)` -> Megatron's `validate_args` -> ...: `parse_xlstm_args` knows which flags the user typed
(`explicit_dests`) and `apply_xlstm_family` sets every family-governed argument the user did not give, warns about
given ones that differ from the family (the run honours them), and refuses the ones the xLSTM model would silently
ignore or that break it. `FAMILY_FLAG_POLICY` is that table; docs/megatron_lm.md prints it.

The family is applied to every argument list parsed here, `--spec` or not: the xLSTM entry points build an
`XLSTMModel` whatever `--spec` says, so a `--spec` naming another module is refused, and a missing one is filled
with `xlstm_megatron.layers.specs xlstm_block_spec` (what Megatron's own GPT builder needs to build our layers).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from xlstm_megatron.layers.config import (
    COMMON_DEFAULTS,
    MEGATRON_FAMILY_DEFAULTS,
    XLSTM_FAMILY_DEFAULTS,
    XLSTMConfig,
    _round_up,
    _round_up_large,
    pattern_from_positions,
)
from xlstm_megatron.ops.init import small_init_std
from xlstm_megatron.runs.errors import ConfigError

ExtraArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
XLSTM_SPEC = ["xlstm_megatron.layers.specs", "xlstm_block_spec"]
MODEL_FAMILIES = ("xlstm", "transformer")

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
    group.add_argument("--model-family", dest="model_family", choices=MODEL_FAMILIES, default="xlstm",
                       help="xlstm: the xLSTM families of --xlstm-block; transformer: the Llama-style baseline "
                            "(Megatron's GPTModel: RoPE, RMSNorm, SwiGLU, no biases, untied) in the same harness")
    group.add_argument("--xlstm-block", dest="xlstm_block", choices=("large", "v1"), default="large",
                       help="block family: xLSTM-7B 'large' or the NeurIPS 2024 'v1' blocks")
    for name, typ, choices, help_text in XLSTM_FLAGS:
        group.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=typ, choices=choices, default=_DATACLASS_DEFAULTS[name],
            help=help_text,
        )
    return parser


def megatron_parser(extra_args_provider: ExtraArgsProvider | None = None) -> argparse.ArgumentParser:
    """Megatron's full argument parser with the xLSTM flags (and the caller's own, if any)."""
    from megatron.training.arguments import add_megatron_arguments

    parser = add_xlstm_args(add_megatron_arguments(argparse.ArgumentParser(prog="xlstm-megatron", allow_abbrev=False)))
    return extra_args_provider(parser) if extra_args_provider else parser


# ---- the family's architecture ---------------------------------------------------------------------------------

Policy = Literal["warn", "refuse", "fixed"]


def _ffn_proj_factor(args: argparse.Namespace) -> float:
    return args.ffn_proj_factor or XLSTM_FAMILY_DEFAULTS[args.xlstm_block]["ffn_proj_factor"]


def family_ffn_hidden_size(args: argparse.Namespace) -> int:
    """The family's FFN width: round_up(ffn_proj_factor x hidden_size, 64), each family with its own rounding."""
    round_up = _round_up_large if args.xlstm_block == "large" else _round_up
    return round_up(_ffn_proj_factor(args) * args.hidden_size, 64)


@dataclass(frozen=True)
class FamilyFlag:
    """How one Megatron argument is governed by the xLSTM family."""

    flag: str
    """Megatron's spelling of the flag (the one that sets the non-default value, for booleans)."""
    large: Any
    """Family value for --xlstm-block large: a constant or a function of the arguments."""
    v1: Any
    on_contradiction: Policy
    """'warn': applied as given with one warning; 'refuse': ConfigError; 'fixed': no Megatron flag can contradict."""
    doc: str
    """Family value in words (docs table) and the reason for the policy."""

    def value(self, args: argparse.Namespace) -> Any:
        v = self.large if args.xlstm_block == "large" else self.v1
        return v(args) if callable(v) else v


_NO_SUCH = "the xLSTM layers ignore it, so the run would not be what the flag says"
FAMILY_FLAG_POLICY: dict[str, FamilyFlag] = {
    "normalization": FamilyFlag(
        "--normalization", MEGATRON_FAMILY_DEFAULTS["large"]["normalization"],
        MEGATRON_FAMILY_DEFAULTS["v1"]["normalization"], "warn",
        "large RMSNorm, v1 LayerNorm (no bias, (1 + w) weight); the other one is built as asked"),
    "layernorm_epsilon": FamilyFlag(
        "--norm-epsilon", MEGATRON_FAMILY_DEFAULTS["large"]["layernorm_epsilon"],
        MEGATRON_FAMILY_DEFAULTS["v1"]["layernorm_epsilon"], "warn", "large 1e-6, v1 1e-5"),
    "add_bias_linear": FamilyFlag(
        "--disable-bias-linear", COMMON_DEFAULTS["add_bias_linear"], COMMON_DEFAULTS["add_bias_linear"], "fixed",
        "off (Megatron has no flag that turns linear biases on)"),
    "add_qkv_bias": FamilyFlag(
        "--add-qkv-bias", False, False, "warn", "off; on adds q/k/v biases to '*' attention layers only"),
    "hidden_dropout": FamilyFlag(
        "--hidden-dropout", COMMON_DEFAULTS["hidden_dropout"], COMMON_DEFAULTS["hidden_dropout"], "warn", "0"),
    "attention_dropout": FamilyFlag(
        "--attention-dropout", COMMON_DEFAULTS["attention_dropout"], COMMON_DEFAULTS["attention_dropout"], "warn",
        "0 (used by '*' attention layers only)"),
    "untie_embeddings_and_output_weights": FamilyFlag(
        "--untie-embeddings-and-output-weights", True, True, "fixed",
        "untied (Megatron has no flag that ties them)"),
    "ffn_hidden_size": FamilyFlag(
        "--ffn-hidden-size", family_ffn_hidden_size, family_ffn_hidden_size, "warn",
        "round_up(ffn_proj_factor x E, 64), factor large 2.6667, v1 1.3; given with --ffn-proj-factor and not "
        "equal to it: refused"),
    "init_method_std": FamilyFlag(
        "--init-method-std", lambda a: small_init_std(a.hidden_size), lambda a: small_init_std(a.hidden_size),
        "warn", "small init sqrt(2 / (5 E)) for input projections and embeddings (output projections keep Wang "
        "init 2 / (L sqrt(E)))"),
    "position_embedding_type": FamilyFlag(
        "--position-embedding-type", "none", "none", "refuse", "none: XLSTMModel has no position embedding"),
    "use_rotary_position_embeddings": FamilyFlag(
        "--use-rotary-position-embeddings", False, False, "refuse", "off: XLSTMModel has no position embedding"),
    "swiglu": FamilyFlag(
        "--swiglu", False, False, "refuse",
        "off: the gated FFN comes from --ffn-activation; --swiglu is accepted when that is silu (large's)"),
    "bias_gelu_fusion": FamilyFlag(
        "--no-bias-gelu-fusion", False, False, "fixed",
        "off: Megatron's fused bias-GELU/GEGLU is the tanh approximation, the family's GELU is exact"),
    "quick_geglu": FamilyFlag("--quick-geglu", False, False, "refuse", f"off ({_NO_SUCH}; use --ffn-activation)"),
    "squared_relu": FamilyFlag("--squared-relu", False, False, "refuse", f"off ({_NO_SUCH}; use --ffn-activation)"),
    "openai_gelu": FamilyFlag("--openai-gelu", False, False, "refuse", f"off ({_NO_SUCH}; use --ffn-activation)"),
    "layernorm_zero_centered_gamma": FamilyFlag(
        "--apply-layernorm-1p", False, False, "refuse", f"off ({_NO_SUCH}: v1's LayerNorm is (1 + w) already)"),
    "qk_layernorm": FamilyFlag("--qk-layernorm", False, False, "refuse", f"off ({_NO_SUCH})"),
    "apply_residual_connection_post_layernorm": FamilyFlag(
        "--apply-residual-connection-post-layernorm", False, False, "refuse", f"off ({_NO_SUCH})"),
    "init_method_xavier_uniform": FamilyFlag(
        "--init-method-xavier-uniform", False, False, "refuse",
        "off (it would replace the official inits everywhere; --init-method-std is the knob)"),
}


_POLICY_WORDS = {"warn": "applied as given, one warning", "refuse": "refused (ConfigError, one line)",
                 "fixed": "cannot be contradicted"}


def family_policy_table() -> str:
    """FAMILY_FLAG_POLICY as the Markdown table docs/megatron_lm.md shows (a test keeps the two equal)."""
    rows = ["| Megatron flag (dest) | large | v1 | given and different | why |", "|---|---|---|---|---|"]
    for dest, rule in FAMILY_FLAG_POLICY.items():
        derived = {"ffn_hidden_size": "family width", "init_method_std": "sqrt(2/(5E))"}.get(dest)
        large, v1 = (derived, derived) if derived else (_shown(rule.large), _shown(rule.v1))
        rows.append(f"| `{rule.flag}` (`{dest}`) | {large} | {v1} | {_POLICY_WORDS[rule.on_contradiction]} | "
                    f"{rule.doc} |")
    return "\n".join(rows)


def _differs(given: Any, family: Any) -> bool:
    if isinstance(given, float) or isinstance(family, float):
        return given is None or family is None or abs(float(given) - float(family)) > 1e-12 * max(1.0, abs(family))
    return given != family


def apply_xlstm_family(args: argparse.Namespace, explicit: set[str]) -> list[str]:
    """Set every family-governed argument not in `explicit` to the family's value (before Megatron's
    `validate_args`); return one warning per explicit flag that differs from the family and is honoured. Raises
    ConfigError (one line, naming the fix) for contradictions the family refuses. `--model-family transformer`
    applies the baseline's family instead (`apply_transformer_family`)."""
    if getattr(args, "model_family", "xlstm") == "transformer":
        return apply_transformer_family(args, explicit)
    block = args.xlstm_block
    spec = getattr(args, "spec", None)
    if spec and not spec[0].startswith("xlstm_megatron"):
        raise ConfigError(f"--spec {' '.join(spec)} is not an xLSTM spec; this entry builds xLSTM models: drop --spec "
                          "or use Megatron-LM's pretrain_gpt.py for other models")
    if not spec:
        args.spec = list(XLSTM_SPEC)
    if args.max_position_embeddings is None:  # unused without position embeddings, but validate_args requires it
        args.max_position_embeddings = args.seq_length
    activation = args.ffn_activation or XLSTM_FAMILY_DEFAULTS[block]["ffn_activation"]
    warnings: list[str] = []
    for dest, rule in FAMILY_FLAG_POLICY.items():
        family = rule.value(args)
        if dest not in explicit:
            setattr(args, dest, family)
            continue
        given = getattr(args, dest)
        if not _differs(given, family):
            continue
        if dest == "swiglu" and activation == "silu":
            continue  # a SiLU GLU is what --ffn-activation silu builds anyway
        if dest == "ffn_hidden_size" and "ffn_proj_factor" in explicit:
            raise ConfigError(f"--ffn-hidden-size {given} contradicts --ffn-proj-factor {args.ffn_proj_factor} "
                              f"(= {family} at hidden size {args.hidden_size}); give only one of them")
        if rule.on_contradiction == "refuse":
            fix = "pass --ffn-activation silu or drop --swiglu" if dest == "swiglu" else f"drop {rule.flag}"
            raise ConfigError(f"{rule.flag} {_shown(given)} contradicts the xLSTM {block} family "
                              f"({rule.doc}); {fix}")
        warnings.append(f"xLSTM {block}: {rule.flag} {_shown(given)} differs from the family's {_shown(family)} "
                        f"({rule.doc}); training with {_shown(given)} as given")
    return warnings


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ---- the Transformer baseline's architecture ------------------------------------------------------------------


def transformer_ffn_hidden_size(args: argparse.Namespace) -> int:
    """Llama's SwiGLU width round_up(8/3 x E, 64): the 4·E MLP's parameters in a gated unit (Megatron's own
    `--swiglu` default rounds down instead)."""
    return _round_up(8 * args.hidden_size / 3, 64)


# dest -> (Megatron flag, family value (constant or function of the args), policy, why). The baseline is Llama's
# block on Megatron's GPTModel; what it shares with the xLSTM families (no biases, no dropout, untied embeddings, the
# same init) is shared so that a comparison differs in the mixer and the position encoding only.
TRANSFORMER_FLAG_POLICY: dict[str, tuple[str, Any, Policy, str]] = {
    "normalization": ("--normalization", "RMSNorm", "warn", "RMSNorm (Llama)"),
    "layernorm_epsilon": ("--norm-epsilon", 1e-5, "warn", "1e-5 (Llama 2/3)"),
    "add_bias_linear": ("--disable-bias-linear", False, "fixed", "no linear biases"),
    "add_qkv_bias": ("--add-qkv-bias", False, "warn", "no q/k/v biases"),
    "hidden_dropout": ("--hidden-dropout", 0.0, "warn", "0, as the xLSTM families"),
    "attention_dropout": ("--attention-dropout", 0.0, "warn", "0"),
    "untie_embeddings_and_output_weights": ("--untie-embeddings-and-output-weights", True, "fixed", "untied"),
    "swiglu": ("--swiglu", True, "fixed", "SwiGLU MLP"),
    "ffn_hidden_size": ("--ffn-hidden-size", transformer_ffn_hidden_size, "warn", "round_up(8/3 x E, 64)"),
    "position_embedding_type": ("--position-embedding-type", "rope", "warn", "RoPE (base --rotary-base, 10000)"),
    "init_method_std": (
        "--init-method-std", lambda a: small_init_std(a.hidden_size), "warn",
        "sqrt(2 / (5 E)) as the xLSTM families (output projections: Wang init 2 / (L sqrt(E)), set in runs.model)"),
}


def apply_transformer_family(args: argparse.Namespace, explicit: set[str]) -> list[str]:
    """`--model-family transformer`: the baseline's values for every governed argument the user did not give
    (TRANSFORMER_FLAG_POLICY), one warning per given one that differs; xLSTM flags and `--spec` are refused (the
    baseline is Megatron's GPTModel with its own local / Transformer Engine layer spec)."""
    xlstm_given = sorted(d for d in explicit if d in _DATACLASS_DEFAULTS or d == "xlstm_block")
    if xlstm_given:
        flag = "--" + xlstm_given[0].replace("_", "-")
        raise ConfigError(f"{flag} is an xLSTM flag, but --model-family transformer builds Megatron's GPTModel; "
                          f"drop {flag} or use --model-family xlstm")
    if getattr(args, "spec", None):
        raise ConfigError(f"--spec {' '.join(args.spec)}: --model-family transformer builds Megatron's own GPT layer "
                          "spec (local or Transformer Engine by --transformer-impl); drop --spec")
    if args.max_position_embeddings is None:  # RoPE needs no table, but validate_args requires the field
        args.max_position_embeddings = args.seq_length
    warnings: list[str] = []
    for dest, (flag, value, _policy, doc) in TRANSFORMER_FLAG_POLICY.items():
        family = value(args) if callable(value) else value
        if dest not in explicit:
            setattr(args, dest, family)
        elif _differs(getattr(args, dest), family):
            given = getattr(args, dest)
            warnings.append(f"Transformer baseline: {flag} {_shown(given)} differs from the family's "
                            f"{_shown(family)} ({doc}); training with {_shown(given)} as given")
    # The architecture record a checkpoint keeps (runs.checkpoint.architecture) reads these: all-attention layers,
    # no soft caps, SwiGLU; so a baseline checkpoint never passes for an xLSTM one.
    args.xlstm_pattern = "*" * args.num_layers
    args.gate_soft_cap, args.output_logit_soft_cap, args.ffn_activation = 0.0, 0.0, "silu"
    return warnings


# ---- parsing ---------------------------------------------------------------------------------------------------


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests `argv` sets explicitly: argv parsed once more with every default suppressed."""
    saved = [(a, a.default) for a in parser._actions]
    saved_parser_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        namespace, _ = parser.parse_known_args(argv, argparse.Namespace())
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_parser_defaults)
    return set(vars(namespace))


_PARSERS: dict[ExtraArgsProvider | None, argparse.ArgumentParser] = {}


def _parse(argv: list[str], extra_args_provider: ExtraArgsProvider | None) -> tuple[argparse.Namespace, list[str]]:
    from megatron.core.msc_utils import MultiStorageClientFeature

    parser = _PARSERS.get(extra_args_provider) or megatron_parser(extra_args_provider)
    _PARSERS[extra_args_provider] = parser  # building Megatron's parser costs ~0.3 s; parsing leaves it unchanged
    args = parser.parse_args(argv)
    args._is_global_batch_size_explicitly_specified = args.global_batch_size is not None  # as Megatron's parse_args
    args.rank, args.world_size = int(os.getenv("RANK", "0")), int(os.getenv("WORLD_SIZE", "1"))
    if not args.enable_msc:
        MultiStorageClientFeature.disable()
    return args, apply_xlstm_family(args, explicit_dests(parser, argv))


def parse_xlstm_args(argv: list[str], extra_args_provider: ExtraArgsProvider | None = None
                     ) -> tuple[argparse.Namespace, list[str]]:
    """(arguments ready for Megatron's `validate_args`, the family warnings to print once on rank 0).

    Megatron's parser plus the xLSTM flags (and `extra_args_provider`'s) with the family applied; rank and world size
    from the environment, as Megatron's `parse_args`. Raises ConfigError for refused flags."""
    return _parse(argv, extra_args_provider)


def megatron_args(argv: list[str], extra_args_provider: ExtraArgsProvider | None = None, world_size: int = 1,
                  rank: int = 0, quiet: bool = True) -> argparse.Namespace:
    """Parsed, family-applied and validated Megatron arguments for `argv` (no global state is set): what
    `pretrain()` would see. `quiet`: no argument dump on stdout and no family warnings on stderr."""
    from megatron.training.arguments import validate_args

    args, warnings = _parse(argv, extra_args_provider)
    args.rank, args.world_size = rank, world_size
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        validate_args(args, {})
    if not quiet:
        for line in warnings:
            print(f"WARNING: {line}", file=sys.stderr)
    return args


# ---- YAML configs as Megatron flags ----------------------------------------------------------------------------

YAML_SECTIONS = ("model", "train", "info")  # info: free-form (name, source, parameter count), not flags


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    out: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            out.setdefault(action.dest, []).append(action)
    return out


def _bool_flag(key: str, value: bool, actions: list[argparse.Action], parser: argparse.ArgumentParser) -> list[str]:
    """The flag that stores `value` into `key`, as Megatron spells it (`--x`, `--no-x`, `--disable-x`)."""
    for action in actions:
        if isinstance(action, argparse.BooleanOptionalAction):
            return [next(o for o in action.option_strings if o.startswith("--no-") is (not value))]
        if action.nargs == 0 and getattr(action, "const", None) is value:
            return [action.option_strings[0]]
    if value == parser.get_default(key) and key not in FAMILY_FLAG_POLICY:
        return []  # Megatron's default, which no flag spells: nothing to pass
    raise ConfigError(f"{key}: {str(value).lower()} has no Megatron flag; drop the key")


def yaml_to_argv(doc: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """A YAML config (`model:`, `train:` sections of parser dests, free-form `info:`) as the argv that sets it.

    Booleans become the flag or its counterpart as Megatron spells it, lists become nargs values, `slstm_at: [..]`
    (0-based sLSTM block indices) becomes `--xlstm-pattern`. Every key must be a dest of `parser`: an unknown one is a
    one-line ConfigError naming the closest valid key. Flags given after this argv override it (argparse: last wins).
    """
    if not isinstance(doc, dict):
        raise ConfigError("a config must be a mapping with `model:` and `train:` sections")
    for section in doc:
        if section not in YAML_SECTIONS:
            close = difflib.get_close_matches(str(section), YAML_SECTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; use {list(YAML_SECTIONS)}"
            raise ConfigError(f"unknown section {section!r}{hint}")
    actions = _actions_by_dest(parser)
    merged: dict[str, Any] = {}
    for section in ("model", "train"):
        body = doc.get(section) or {}
        if not isinstance(body, dict):
            raise ConfigError(f"section {section!r} must be a mapping of argument names to values")
        for key, value in body.items():
            if key in merged:
                raise ConfigError(f"{key!r} is set in both `model:` and `train:`; keep one")
            merged[key] = value
    if "slstm_at" in merged:
        if "xlstm_pattern" in merged:
            raise ConfigError("give slstm_at or xlstm_pattern, not both")
        if "num_layers" not in merged:
            raise ConfigError("slstm_at needs num_layers; set model.num_layers")
        try:
            merged["xlstm_pattern"] = pattern_from_positions(merged["num_layers"], merged.pop("slstm_at"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    argv: list[str] = []
    for key, value in merged.items():
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}")
        if value is None:
            continue
        action = actions[key][0]
        if isinstance(value, bool) and not (action.nargs is None and action.type is not None):
            argv += _bool_flag(key, value, actions[key], parser)
        elif isinstance(value, list | tuple):
            if action.nargs in (None, 0, "?"):
                raise ConfigError(f"{key} takes one value, not a list")
            argv += [action.option_strings[0], *map(str, value)]
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


# ---- the start-up line -----------------------------------------------------------------------------------------


def architecture_line(args: argparse.Namespace) -> str:
    """One line for the run's start: family, pattern, widths, vocab and exact parameter count."""
    from xlstm_megatron.models.param_count import count_parameters
    from xlstm_megatron.runs.model import is_transformer, xlstm_config_from_args

    if is_transformer(args):
        return _transformer_architecture_line(args)
    config = xlstm_config_from_args(args)
    pattern = config.layer_pattern
    counts = ", ".join(f"{pattern.count(s)} {name}" for s, name in (("m", "mLSTM"), ("s", "sLSTM"), ("*", "attn"))
                       if s in pattern)
    if config.xlstm_block == "large":
        mixer = f"qk {config.mlstm_qk_width} v {config.mlstm_v_width}"
    else:
        mixer = f"inner {config.mlstm_inner_size}"
    has_ffn = config.xlstm_block == "large" or "s" in pattern or "*" in pattern
    ffn = f"ffn {config.ffn_hidden_size} {config.ffn_activation}-GLU" if has_ffn else "no ffn"
    vocab = _padded_vocab(args)
    tied = not args.untie_embeddings_and_output_weights
    params = f"{count_parameters(config, vocab, tied):,} parameters" if vocab else "parameters: vocab unknown"
    return (f"xLSTM {config.xlstm_block}: {config.num_layers} blocks {pattern} ({counts}), E {config.hidden_size}, "
            f"{config.num_attention_heads} heads, {mixer}, {ffn}, {config.normalization} eps "
            f"{config.layernorm_epsilon:g}, init std {config.init_method_std:.4g}, "
            f"{'tied' if tied else 'untied'} embeddings, vocab {vocab}, {params}")


def _padded_vocab(args: argparse.Namespace) -> int | None:
    vocab = getattr(args, "padded_vocab_size", None)
    if vocab is None and args.vocab_size is not None:
        multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
        vocab = -(-args.vocab_size // multiple) * multiple  # Megatron's padding (vocab_size_with_padding)
    return vocab


def _transformer_architecture_line(args: argparse.Namespace) -> str:
    from xlstm_megatron.runs.model import parameter_counts_from_args, transformer_config_from_args

    config = transformer_config_from_args(args)
    vocab = _padded_vocab(args)
    groups = config.num_query_groups or config.num_attention_heads
    gqa = f", {groups} kv groups" if groups != config.num_attention_heads else ""
    position = "RoPE" if args.position_embedding_type == "rope" else args.position_embedding_type
    mlp = "SwiGLU" if config.gated_linear_unit else "MLP"
    params = (f"{parameter_counts_from_args(args)['total']:,} parameters" if vocab else "parameters: vocab unknown")
    return (f"Transformer baseline: {config.num_layers} layers, E {config.hidden_size}, {config.num_attention_heads} "
            f"heads of {config.kv_channels}{gqa}, {position}, ffn {config.ffn_hidden_size} {mlp}, "
            f"{config.normalization} eps {config.layernorm_epsilon:g}, init std {config.init_method_std:.4g}, "
            f"{'untied' if args.untie_embeddings_and_output_weights else 'tied'} embeddings, vocab {vocab}, {params}")


__all__ = [
    "FAMILY_FLAG_POLICY", "XLSTM_FLAGS", "add_xlstm_args", "apply_xlstm_family", "architecture_line",
    "MODEL_FAMILIES", "TRANSFORMER_FLAG_POLICY", "apply_transformer_family", "explicit_dests",
    "family_ffn_hidden_size", "family_policy_table", "megatron_args", "megatron_parser", "parse_xlstm_args",
    "transformer_ffn_hidden_size", "yaml_to_argv",
]

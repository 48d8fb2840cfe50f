"""Run configuration: YAML files with Megatron-style command-line overrides.

A YAML file has two sections, `model` (XLSTMConfig fields: architecture) and `train` (RunConfig fields: parallelism,
data, optimisation, logging, checkpoints), and an optional free-form `info` section (name, source, parameter count).
Every key is also a flag (`--hidden-size 128`, `--micro-batch-size 4`); precedence is defaults < YAML < flags.
Unknown keys fail before any work with the closest valid name.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad run configuration; the message is one line naming the fix."""


@dataclass
class RunConfig:
    # ---- parallelism / launch -------------------------------------------------------------------------------------
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    nproc: int = 1
    """Processes to start when not launched by torchrun/Slurm (the CPU demo uses 2 over gloo)."""
    distributed_backend: Literal["auto", "gloo", "nccl"] = "auto"

    # ---- data -----------------------------------------------------------------------------------------------------
    data_path: list[str] | None = None
    """Megatron blend: `prefix` or `w1 prefix1 w2 prefix2 ...` (prefix without .bin/.idx)."""
    demo_data: bool = False
    """Prepare and use the shipped Shakespeare corpus with a BPE tokenizer trained on it."""
    demo_data_dir: str = "runs/demo_data"
    demo_vocab_size: int = 2048
    demo_max_plays: int | None = None
    mock_data: bool = False
    split: str = "98,2,0"
    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    eod_token: str | None = None
    """End-of-document token text, when the tokenizer files do not say."""
    seq_length: int = 256
    vocab_size: int | None = None
    """Model vocab; None: the tokenizer's, padded to make_vocab_size_divisible_by x TP."""
    make_vocab_size_divisible_by: int = 64
    data_cache_dir: str | None = None

    # ---- optimisation ---------------------------------------------------------------------------------------------
    micro_batch_size: int = 4
    global_batch_size: int | None = None
    """None: micro_batch_size x data-parallel size (no accumulation)."""
    train_iters: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 10
    lr_decay_iters: int | None = None
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-5
    clip_grad: float = 1.0
    bf16: bool = False
    seed: int = 1234

    # ---- evaluation, logging, checkpoints -------------------------------------------------------------------------
    eval_interval: int = 50
    eval_iters: int = 10
    log_interval: int = 10
    save: str | None = None
    save_interval: int | None = None
    load: str | None = None
    """Checkpoint directory to resume from; None: `save` (auto-resume from its latest checkpoint)."""
    exit_interval: int | None = None
    """Stop (after saving) once the iteration is a multiple of this: for tests and preemption drills."""
    tensorboard_dir: str | None = None
    loss_curve: str | None = None
    """PNG path for the loss curve at the end (default: <save>/loss_curve.png)."""
    sample_prompt: str | None = None
    sample_tokens: int = 0
    progress_bar: bool = True


# Model keys that get their own flag (every XLSTMConfig field is accepted in YAML).
MODEL_FLAGS = (
    "xlstm_block", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "xlstm_pattern",
    "slstm_num_heads", "mlstm_chunk_size", "mlstm_backward", "gate_soft_cap", "output_logit_soft_cap",
    "mlstm_qk_dim_factor", "mlstm_v_dim_factor", "mlstm_proj_factor", "ffn_proj_factor", "slstm_forget_gate",
    "conv_kernel_size", "mlstm_kernel", "slstm_kernel", "transformer_impl", "fp8", "fp8_recipe",
)
MODEL_ONLY_KEYS = {"slstm_at"}  # convenience: the paper's sLSTM positions instead of a pattern string


def _model_field_types() -> dict[str, Any]:
    from xlstm_megatron.layers.config import XLSTMConfig

    init_fields = {f.name for f in dataclasses.fields(XLSTMConfig) if f.init}
    return {k: v for k, v in _field_types(XLSTMConfig).items() if k in init_fields}


def _unknown(keys: set[str], valid: set[str], where: str) -> None:
    for key in sorted(keys - valid):
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown key {key!r} in {where}{hint}")


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields, each in the namespace of the class that declared it."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        namespace = {**vars(typing), **vars(types), **vars(sys.modules[klass.__module__])}
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
    return hints


def _scalar_type(annotation: Any) -> type | None:
    """The plain scalar type of a field annotation (int | None -> int); None for lists/callables/etc."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in args if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else None
    if typing.get_origin(annotation) is Literal:
        return type(args[0])
    return annotation if annotation in (int, float, str, bool) else None


def _add_flag(parser: argparse.ArgumentParser, name: str, annotation: Any, dest: str) -> None:
    flag = "--" + name.replace("_", "-")
    typ = _scalar_type(annotation)
    if typ is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
    elif name == "data_path":
        parser.add_argument(flag, dest=dest, nargs="+", default=argparse.SUPPRESS)
    elif typ is not None:
        parser.add_argument(flag, dest=dest, type=typ, default=argparse.SUPPRESS)


def add_run_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, help="YAML file with `model:` and `train:` sections")
    for name, annotation in _field_types(RunConfig).items():
        _add_flag(parser, name, annotation, f"train.{name}")
    model_types = _model_field_types()
    for name in MODEL_FLAGS:
        _add_flag(parser, name, model_types[name], f"model.{name}")
    return parser


def load_run_config(args: argparse.Namespace) -> tuple[dict[str, Any], RunConfig]:
    """(model kwargs for make_xlstm_config, RunConfig) from --config and flags; raises ConfigError on bad input."""
    doc: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"config file {str(args.config)!r} does not exist; pass an existing YAML with --config")
        doc = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{args.config} must be a mapping with `model:` and `train:` sections")
        _unknown(set(doc), {"model", "train", "info"}, str(args.config))  # info: free-form (name, source, params)
    model = dict(doc.get("model") or {})
    train = dict(doc.get("train") or {})
    _unknown(set(model), set(_model_field_types()) | MODEL_ONLY_KEYS, f"{args.config or 'flags'} model section")
    _unknown(set(train), {f.name for f in dataclasses.fields(RunConfig)}, f"{args.config or 'flags'} train section")
    for dest, value in vars(args).items():
        section, _, key = dest.partition(".")
        if section == "model":
            model[key] = value
        elif section == "train":
            train[key] = value
    if "slstm_at" in model:
        from xlstm_megatron.layers.config import pattern_from_positions

        if "num_layers" not in model:
            raise ConfigError("slstm_at needs num_layers; set model.num_layers")
        model["xlstm_pattern"] = pattern_from_positions(model["num_layers"], model.pop("slstm_at"))
    try:
        run = RunConfig(**train)
    except TypeError as e:
        raise ConfigError(f"bad train section: {e}") from None
    _check_types(run)
    _check_values(run)
    return model, run


def _check_values(run: RunConfig) -> None:
    decay = run.lr_decay_iters or run.train_iters
    if not 0 <= run.lr_warmup_iters < max(decay, 1):
        raise ConfigError(f"lr_warmup_iters={run.lr_warmup_iters} must be below lr_decay_iters={decay} "
                          "(defaults to train_iters); lower the warmup or raise the decay length")
    if run.min_lr > run.lr:
        raise ConfigError(f"min_lr={run.min_lr} is above lr={run.lr}; lower min_lr")
    for name in ("micro_batch_size", "train_iters", "seq_length", "nproc", "log_interval"):
        if getattr(run, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(run, name)}")


def _check_types(run: RunConfig) -> None:
    for name, annotation in _field_types(RunConfig).items():
        value, typ = getattr(run, name), _scalar_type(annotation)
        if value is None or typ is None or isinstance(value, typ) or (typ is float and isinstance(value, int)):
            continue
        raise ConfigError(f"train.{name}={value!r} should be a {typ.__name__}")


def dump_run_config(model: dict[str, Any], run: RunConfig) -> str:
    """YAML of the effective configuration (saved next to checkpoints)."""
    return yaml.safe_dump({"model": model, "train": dataclasses.asdict(run)}, sort_keys=False)


__all__ = ["ConfigError", "RunConfig", "add_run_args", "dump_run_config", "load_run_config"]

"""What `xlstm-megatron train` checks before any process starts or any byte is written, and the one-line reports of
the faults the loop itself stops on. docs/faults.md has the policy.

Before start (each a one-line `ConfigError` naming the fix, exit status 2, nothing written): the model's own config
checks (heads and widths against the TP size, ...), the tokenizer Megatron will build against `--vocab-size`, and a
checkpoint to resume from (its files complete, its architecture and padded vocab this run's).

In the loop: with `--check-for-nan-in-loss-and-grad` (Megatron's default) a NaN/Inf in the loss or a gradient makes
Megatron raise on the rank that sees it, before the optimizer step; the worker turns that into one line naming the
iteration and the checkpoint to resume from.
"""

from __future__ import annotations

import re
import traceback
from argparse import Namespace
from pathlib import Path

from xlstm_megatron.runs.errors import ConfigError

# Exit status of a run stopped by a bad step (as for bad input: the run cannot go on as configured).
BAD_STEP_EXIT = 2


def fault_defaults(argv: list[str]) -> list[str]:
    """The command's defaults for the fault machinery, where the user gave none: `--rerun-mode disabled`, so a NaN/Inf
    stops the run at once on every iteration. Megatron's default (`validate_results`) is for GPU fleets: it skips the
    first iteration of every job, re-runs a failed step in place, then saves and exits 16 asking to resume on another
    GPU; on one host (CPU: every rank's device is "cpu") that second run never happens and every resume asks again."""
    if any(a == "--rerun-mode" or a.startswith("--rerun-mode=") for a in argv):
        return []
    return ["--rerun-mode", "disabled"]


def assertion_text(error: AssertionError) -> str:
    """An assertion's message, or for a bare `assert cond` (Megatron has many) the failing source line and place."""
    if str(error).strip():
        return str(error).strip().splitlines()[0]
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "an assertion without a message"
    last = frames[-1]
    return f"`{(last.line or '').strip()}` failed ({Path(last.filename).name}:{last.lineno})"


def argparse_error(printed: str) -> str:
    """argparse's error (the last `prog: error: ...` line of what it printed), with the closest flags for unknown
    ones."""
    import difflib

    from xlstm_megatron.runs.args import megatron_parser

    lines = [line for line in printed.splitlines() if ": error: " in line]
    text = lines[-1].split(": error: ", 1)[1] if lines else "bad command line"
    if text.startswith("unrecognized arguments:"):
        known = [o for a in megatron_parser()._actions for o in a.option_strings]
        hints = [f"{flag} -> {close[0]}" for flag in text.split(":", 1)[1].split() if flag.startswith("--")
                 for close in [difflib.get_close_matches(flag.split("=")[0], known, n=1)] if close]
        text += f" (closest: {', '.join(hints)})" if hints else ""
    return f"{text}; see `xlstm-megatron train --help`"


def check_model(args: Namespace) -> None:
    """The model's own config checks (Megatron's TransformerConfig and XLSTMConfig: heads and sLSTM heads divisible by
    TP, widths, patterns), which would otherwise fail in every rank after start-up."""
    from xlstm_megatron.runs.model import is_transformer, transformer_config_from_args, xlstm_config_from_args

    config = (transformer_config_from_args if is_transformer(args) else xlstm_config_from_args)(args)  # either family
    cp = getattr(args, "context_parallel_size", 1)
    if is_transformer(args):
        if cp > 1 and args.transformer_impl != "transformer_engine":
            raise ConfigError(f"--context-parallel-size {cp}: Megatron's attention has context parallelism only with "
                              "Transformer Engine; add --transformer-impl transformer_engine or drop it")
        return
    from xlstm_megatron.layers.mamba import require_mamba_ssm

    if "M" in (args.xlstm_pattern or ""):
        try:
            require_mamba_ssm()  # built in every rank otherwise, after start-up
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if cp > 1:
        from xlstm_megatron.layers.kinds import check_context_parallel

        try:
            check_context_parallel(config, cp)
        except ValueError as error:
            raise ConfigError(f"--context-parallel-size {cp}: {error}") from None
        piece = args.seq_length // (2 * cp)
        if config.xlstm_block == "v1" and piece < config.conv_kernel_size - 1:
            raise ConfigError(f"--context-parallel-size {cp}: a CP piece holds {piece} tokens (seq length / 2 CP), "
                              f"fewer than the conv's {config.conv_kernel_size - 1}-token window; lower it")
    # the mixers read the document starts off the dataset's mask; without it state would run across documents
    if getattr(args, "reset_attention_mask", False) and not getattr(args, "create_attention_mask_in_dataloader", True):
        raise ConfigError("--reset-attention-mask: the xLSTM layers find document starts in the dataloader's "
                          "attention mask; drop --no-create-attention-mask-in-dataloader")
    middle_stages = args.pipeline_model_parallel_size > 2 or (
        args.pipeline_model_parallel_size > 1 and getattr(args, "virtual_pipeline_model_parallel_size", None))
    if getattr(args, "reset_attention_mask", False) and middle_stages:
        raise ConfigError("--reset-attention-mask: middle pipeline stages read no batch (Megatron's layout), so their "
                          "xLSTM layers would not see the document starts; use PP <= 2 without virtual stages")


def check_tokenizer(args: Namespace) -> None:
    """Build the tokenizer exactly as `pretrain()` will (Megatron's `build_tokenizer`, which sets
    `args.padded_vocab_size`), and refuse a `--vocab-size` it would ignore or that the tokenizer exceeds."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    try:
        tokenizer = build_tokenizer(args)
    except Exception as e:  # noqa: BLE001 - missing files, bad types and library errors are all the same user error
        hint = ("; pass the directory holding tokenizer.json" if args.tokenizer_type == "HuggingFaceTokenizer"
                and args.tokenizer_model and str(args.tokenizer_model).endswith(".json") else "")
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot build the {args.tokenizer_type} (--tokenizer-model {args.tokenizer_model}): "
                          f"{text}{hint}") from None
    if args.tokenizer_type not in ("NullTokenizer", "NullMultimodalTokenizer", "TikTokenizer") and args.vocab_size:
        have = int(tokenizer.vocab_size)
        if have > args.vocab_size:
            raise ConfigError(f"the {args.tokenizer_type} has {have} tokens but --vocab-size is {args.vocab_size}; "
                              f"the model's vocab must hold every token: drop --vocab-size (the model's vocab comes "
                              f"from the tokenizer) or use a smaller tokenizer")
        if have != args.vocab_size:
            raise ConfigError(f"--vocab-size {args.vocab_size} is ignored with the {args.tokenizer_type} (Megatron "
                              f"sizes the model from its {have} tokens); drop --vocab-size")


def check_async_save(args: Namespace) -> None:
    """`--async-save` as Megatron 0.19 runs it: only with `--use-persistent-ckpt-worker` (otherwise it is turned off
    with a warning), whose worker process calls `torch.cuda.set_device` (so not without a GPU), with the NVRx
    strategy (the default) only where `nvidia-resiliency-ext` is installed."""
    import importlib.util

    import torch

    if not args.async_save:
        return
    if not args.use_persistent_ckpt_worker:
        raise ConfigError("--async-save needs --use-persistent-ckpt-worker in Megatron 0.19 (without it the save is "
                          "synchronous); add it or drop --async-save")
    if not torch.cuda.is_available():
        raise ConfigError("--async-save needs a GPU (Megatron's persistent checkpoint worker calls "
                          "torch.cuda.set_device); drop --async-save on CPU")
    if args.async_strategy == "nvrx" and importlib.util.find_spec("nvidia_resiliency_ext") is None:
        raise ConfigError("--async-save uses NVRx by default, and nvidia-resiliency-ext is not installed; install it "
                          "or pass --async-strategy mcore")


def check_resume(args: Namespace) -> None:
    """A checkpoint to resume from (`--load`, which defaults to `--save`): the one Megatron will read (the latest
    marker, or `--ckpt-step`) must be complete and hold this architecture and padded vocab."""
    from xlstm_megatron.runs.checkpoint import (
        check_architecture,
        check_checkpoint_files,
        iteration_dir,
        latest_iteration,
    )

    if not args.load:
        return
    load = Path(args.load)
    if load.exists() and not load.is_dir():
        raise ConfigError(f"--load/--save {load} is a file; pass a directory")
    it = getattr(args, "ckpt_step", None) or latest_iteration(load)  # Megatron's rule: --ckpt-step wins when set
    if it is None:
        return
    path = iteration_dir(load, it)
    if not path.is_dir():
        raise ConfigError(f"--ckpt-step {it}: {path} does not exist; pass an iteration saved under {load}")
    check_checkpoint_files(path)
    check_architecture(path, args)  # --finetune too: it still loads the model's weights


_VALIDATION = re.compile(r"Unexpected result (?P<value>\S+) \(message='(?P<message>.*)'\)", re.S)


def bad_step_line(error: BaseException, args: Namespace) -> str | None:
    """The one line for Megatron's fatal result validation (`validate_result` with `--rerun-mode disabled` raises a
    RuntimeError 'Rank r, node n, device d, iteration i: Unexpected result nan (message=...)'), or None for any other
    error. The iteration is the loop's (`args.curr_iteration` + 1): the rerun state machine's own count runs one
    ahead after a resume."""
    from xlstm_megatron.runs.checkpoint import latest_iteration

    match = _VALIDATION.search(str(error)) if isinstance(error, RuntimeError) else None
    if match is None:
        return None
    value, message = match["value"], match["message"]
    what = "Inf" if "inf" in value.lower() else "NaN"
    where = "the gradients" if "grad" in message else "the loss"
    iteration = int(getattr(args, "curr_iteration", -1)) + 1
    try:
        last = latest_iteration(args.save) if args.save else None
    except ConfigError:
        last = None
    if last is None:
        kept = "no checkpoint was saved before it" if args.save else "nothing is saved (no --save)"
        resume = "fix the cause and start again"
    else:
        kept = f"the last checkpoint (iteration {last}, {args.save}) is intact"
        resume = (f"fix the cause and rerun the same command to resume from it, or add --iterations-to-skip "
                  f"{iteration} to skip that batch")
    return (f"{what} in {where} at iteration {iteration} (Megatron: {message}); the run stopped before that "
            f"step's update and wrote nothing after it: {kept}; {resume}")

"""`xlstm-megatron train`: Megatron's `pretrain()` with the xLSTM model, launched the way users launch Megatron.

    xlstm-megatron train [--config run.yaml] [--nproc N] [any megatron.training flag] [xLSTM flags] [runner flags]

The YAML's `model:` and `train:` keys are Megatron argument names (`hidden_size`, `lr`, `tensor_model_parallel_size`,
...); they become flags in front of the command line's, so the command line wins. Everything is checked before a
process starts or a byte is written (one-line errors). Under torchrun / srun every rank runs `pretrain()`; otherwise
`--nproc N` starts N local ranks. Around the loop, not inside it: the demo corpus and tokenizer before, and after it
(rank 0) the loss-curve PNG from Megatron's TensorBoard events, a text sample from the last checkpoint, the unigram
baseline and `summary.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from xlstm_megatron.runs.errors import ConfigError


def add_runner_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command's own flags (everything else is Megatron's or the xLSTM family's)."""
    g = parser.add_argument_group("xlstm-megatron train")
    g.add_argument("--nproc", type=int, default=1, help="local ranks to start when not under torchrun/srun")
    g.add_argument("--demo-data", action="store_true",
                   help="prepare the shipped Shakespeare corpus and a BPE trained on it; sets --data-path and the "
                        "tokenizer flags")
    g.add_argument("--demo-data-dir", default="runs/demo_data")
    g.add_argument("--demo-vocab-size", type=int, default=2048)
    g.add_argument("--demo-max-plays", type=int, default=None)
    g.add_argument("--loss-curve", default=None, help="PNG of the loss curve (default: <save>/loss_curve.png)")
    g.add_argument("--sample-prompt", default="", help="prompt of the text sample written after training")
    g.add_argument("--sample-tokens", type=int, default=0, help="length of that sample (0: none)")
    g.add_argument("--deepspeed", dest="deepspeed_config", default=None, metavar="DS_CONFIG_JSON",
                   help="train with DeepSpeed (ZeRO 1-3, offload) instead of Megatron's loop: same model, data and "
                        "report; Megatron's tensor (and sequence) parallelism for the layers")
    return parser


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist; pass an existing YAML with --config")
    doc = yaml.safe_load(p.read_text()) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must be a mapping with `model:` and `train:` sections")
    return doc


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def device_flags(argv: list[str]) -> list[str]:
    """Flags this machine needs that the user did not give: on CPU gloo, CPU initialisation and no CUDA fusions;
    without Apex no gradient-accumulation fusion; without Transformer Engine the local layer implementation; without
    NVIDIA's one_logger no telemetry."""
    import torch

    from xlstm_megatron.layers.config import have_transformer_engine

    wanted: list[tuple[str, list[str]]] = []
    if not torch.cuda.is_available():
        wanted += [("--distributed-backend", ["--distributed-backend", "gloo"]),
                   ("--use-cpu-initialization", ["--use-cpu-initialization"])]
        wanted += [(f, [f]) for f in ("--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
                                      "--no-masked-softmax-fusion", "--no-persist-layer-norm", "--no-rope-fusion")]
    try:
        import apex  # noqa: F401  (NVIDIA apex provides the fused weight-gradient accumulation)

        has_apex = hasattr(apex, "amp")
    except ImportError:
        has_apex = False
    if not has_apex:
        wanted.append(("--gradient-accumulation-fusion", ["--no-gradient-accumulation-fusion"]))
    if not have_transformer_engine():
        wanted.append(("--transformer-impl", ["--transformer-impl", "local"]))
    try:
        import one_logger  # noqa: F401  (NVIDIA's telemetry; without it Megatron prints a warning every run)
    except ImportError:
        wanted.append(("--enable-one-logger", ["--no-one-logger"]))
    extra: list[str] = []
    for flag, value in wanted:
        if not _given(argv, flag) and not _given(argv, value[0]):
            extra += value
    return extra


def build_argv(cli: list[str]) -> list[str]:
    """The full Megatron argument list of a run: YAML flags, then the command line, then what this machine needs."""
    from xlstm_megatron.runs.args import megatron_parser, yaml_to_argv

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(cli)
    argv = yaml_to_argv(_read_yaml(known.config), megatron_parser(add_runner_args)) if known.config else []
    argv += rest
    return argv + device_flags(argv)


def _prepare_data(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """Demo data: build the corpus and tokenizer (once; cached) and point Megatron's data flags at them. A data path
    given by the user is checked here, before any process starts."""
    from xlstm_megatron.data.datasets import (
        check_data_prefixes,
        check_splits_have_tokens,
        parse_data_path,
        parse_split,
    )
    from xlstm_megatron.data.errors import DataConfigError

    try:
        if args.demo_data:
            if args.data_path or args.mock_data:
                raise ConfigError("--demo-data brings its own data; drop --data-path / --mock-data")
            from xlstm_megatron.data.preprocess import prepare_demo_data

            prefix, tok_dir = prepare_demo_data(args.demo_data_dir, args.demo_vocab_size, max_plays=args.demo_max_plays)
            return argv + ["--data-path", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
                           "--tokenizer-model", str(tok_dir)]
        if not args.mock_data:
            if not args.data_path and not args.per_split_data_args_path and not args.train_data_path:
                raise ConfigError("no data: pass --data-path PREFIX (from `xlstm-megatron preprocess`), "
                                  "--demo-data or --mock-data")
            if args.data_path:
                prefixes = parse_data_path(args.data_path)[0]
                check_data_prefixes(prefixes)
                # Megatron's default split (it warns) gives test 1/1000 of the documents: none for a small corpus
                wanted = [int(bool(args.train_iters)), args.eval_iters, args.eval_iters]  # only zero / non-zero
                check_splits_have_tokens(prefixes, parse_split(args.split or "969, 30, 1"), wanted, args.seq_length)
    except DataConfigError as e:
        raise ConfigError(str(e)) from None
    return argv


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    import io

    from xlstm_megatron.runs.args import parse_xlstm_args

    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink):  # argparse prints the whole usage (hundreds of flags) before its error
            return parse_xlstm_args(argv, add_runner_args)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        from xlstm_megatron.training.checks import argparse_error

        raise ConfigError(argparse_error(sink.getvalue())) from None


def parse_run_args(argv: list[str], world_size: int, rank: int = 0, quiet: bool = True
                   ) -> tuple[argparse.Namespace, list[str]]:
    """Parse, apply the xLSTM family, and validate with Megatron's own `validate_args` (its assertions become
    one-line ConfigErrors). Returns (args, family warnings)."""
    import contextlib
    import io

    from megatron.training.arguments import validate_args

    from xlstm_megatron.compat import enable_pretrain_shims

    enable_pretrain_shims()  # validate_args queries the GPU

    args, warnings = _parse(argv)
    if args.save and args.load is None:
        args.load = args.save  # resume a run from its own checkpoints, as Megatron-LM recipes pass both
    if args.save and args.tensorboard_dir is None:
        args.tensorboard_dir = str(Path(args.save) / "tensorboard")  # the loss curve is drawn from these events
    args._is_global_batch_size_explicitly_specified = args.global_batch_size is not None
    args.rank, args.world_size = rank, world_size
    sink = io.StringIO() if quiet else sys.stdout
    try:
        with contextlib.redirect_stdout(sink):
            validate_args(args, {})
    except AssertionError as e:
        from xlstm_megatron.training.checks import assertion_text

        raise ConfigError(f"Megatron refuses these arguments: {assertion_text(e)}") from None
    _check_schedule(args)
    return args, warnings


def _check_schedule(args: argparse.Namespace) -> None:
    """What Megatron would only assert (or crash on) after building the model."""
    if args.train_iters and args.eval_interval is None and not args.skip_train:
        raise ConfigError("--eval-interval is unset; Megatron sizes the validation set from it: pass --eval-interval N "
                          "(with --eval-iters 0 nothing is evaluated)")
    if args.train_iters is not None:
        decay = args.lr_decay_iters or args.train_iters
        warmup = args.lr_warmup_iters or int((args.lr_warmup_fraction or 0) * decay)
        if warmup >= decay:
            raise ConfigError(f"the LR warm-up ({warmup} iterations) must be shorter than the decay "
                              f"({decay}: --lr-decay-iters, default --train-iters); lower --lr-warmup-iters")


def _check_before_start(args: argparse.Namespace) -> None:
    """The model's config checks, the tokenizer against the vocab, and a checkpoint to resume from (complete, this
    architecture and padded vocab): one line naming the first problem (training/checks.py)."""
    from xlstm_megatron.training.checks import check_model, check_resume, check_tokenizer

    check_model(args)
    check_tokenizer(args)  # sets args.padded_vocab_size, which check_resume compares with the checkpoint's
    check_resume(args)


def _worker(argv: list[str], errors: Any = None) -> None:
    """One rank: Megatron's global state from the same argument list, then `pretrain()`. A bad step (NaN/Inf) ends
    the rank with exit status 2 and one line: printed here, or under `--nproc` put on `errors` for the launcher to
    print once (every rank that sees the NaN reports it)."""
    from megatron.training.global_vars import set_global_variables

    from xlstm_megatron.compat import pretrain_context
    from xlstm_megatron.runs.args import architecture_line
    from xlstm_megatron.runs.launch import launch_env, prepare_device, shutdown_parallel
    from xlstm_megatron.training.checks import BAD_STEP_EXIT, bad_step_line
    from xlstm_megatron.training.engine import run_pretrain

    env = launch_env()
    prepare_device()
    with pretrain_context():
        args, warnings = parse_run_args(argv, env.world_size, env.rank, quiet=env.rank != 0)
        set_global_variables(args)
        if env.rank == 0:
            for w in warnings:
                print(f"warning: {w}", flush=True)
            print(architecture_line(args), flush=True)
        try:
            if args.deepspeed_config:
                from xlstm_megatron.training.deepspeed_engine import run_deepspeed

                run_deepspeed(args)
            else:
                run_pretrain(args)
        except SystemExit as e:  # Megatron exits the process on --exit-interval/-duration and signals: a clean stop
            if e.code not in (0, None):
                raise
        except RuntimeError as e:
            line = bad_step_line(e, args)
            if line is None:
                raise
            if errors is not None:
                errors.put((env.rank, line))
            else:
                print(f"error: {line}", file=sys.stderr, flush=True)
            raise SystemExit(BAD_STEP_EXIT) from None
    shutdown_parallel()  # leave the process as it was (one-process runs go on to write the report here)


@contextlib.contextmanager
def _forward_sigterm() -> Iterator[None]:
    """While `--nproc` ranks run: a SIGTERM to the launcher goes to every rank, as torchrun and srun deliver it, so
    `--exit-signal-handler` saves and stops them all; the launcher itself waits for them."""
    import multiprocessing
    import signal

    def forward(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_local_ranks(args: argparse.Namespace, argv: list[str]) -> int:
    """`--nproc` ranks; a rank stopped by a bad step is reported in one line (the lowest reporting rank's)."""
    import multiprocessing

    from torch.multiprocessing import ProcessExitedException

    from xlstm_megatron.runs.launch import run_processes
    from xlstm_megatron.training.checks import BAD_STEP_EXIT

    errors = multiprocessing.get_context("spawn").SimpleQueue() if args.nproc > 1 else None
    try:
        with _forward_sigterm():
            run_processes(_worker, args.nproc, args=(argv, errors))
    except SystemExit as e:  # one process: the worker printed its line
        if e.code != BAD_STEP_EXIT:
            raise
        return BAD_STEP_EXIT
    except ProcessExitedException as e:
        reports = []
        while errors is not None and not errors.empty():
            reports.append(errors.get())
        if e.exit_code == BAD_STEP_EXIT and reports:
            print(f"error: {min(reports)[1]}", file=sys.stderr, flush=True)
            return BAD_STEP_EXIT
        if e.signal_name == "SIGTERM":
            print("error: the ranks were terminated by SIGTERM without saving; pass --exit-signal-handler to save "
                  "a checkpoint and stop cleanly on SIGTERM", file=sys.stderr, flush=True)
            return 128 + 15
        raise
    return 0


def train_main(cli: list[str], sample_text: Callable[[str, str, int, int], str] | None = None) -> int:
    """The command; `sample_text` (from the inference tier, wired by the CLI) writes the text sample."""
    from xlstm_megatron.runs.launch import launch_env
    from xlstm_megatron.training.checks import check_async_save, fault_defaults

    # Megatron-LM's launch scripts export this (TP/CP on Hopper and older need it); the ranks inherit it
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    try:  # everything that can be checked before a process starts or a byte is written
        env = launch_env()
        argv = build_argv(cli)
        argv += fault_defaults(argv)
        probe, _ = _parse(argv)  # unvalidated: only the world size and the data flags are read from it
        check_async_save(probe)  # before validate_args, which turns --async-save off with only a warning
        world = env.world_size if env.launched else probe.nproc
        argv = _prepare_data(probe, argv)
        args, _ = parse_run_args(argv, world_size=world)
        _check_before_start(args)
        from xlstm_megatron.training.deepspeed_engine import check_deepspeed_args
        check_deepspeed_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if env.launched:
        try:
            _worker(argv)
        except SystemExit as e:  # a bad step: the rank printed its line
            return int(e.code or 0)
        if env.rank != 0:
            return 0
    else:
        code = _run_local_ranks(args, argv)
        if code:
            return code
    from xlstm_megatron.training.report import write_report

    write_report(args, sample_text)
    return 0

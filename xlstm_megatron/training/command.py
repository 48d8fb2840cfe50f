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
import os
import sys
from collections.abc import Callable
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
    from xlstm_megatron.data.datasets import check_data_prefixes, parse_data_path
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
                check_data_prefixes(parse_data_path(args.data_path)[0])
    except DataConfigError as e:
        raise ConfigError(str(e)) from None
    return argv


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from xlstm_megatron.runs.args import parse_xlstm_args

    try:
        return parse_xlstm_args(argv, add_runner_args)
    except SystemExit as e:  # argparse already printed its one-line usage error
        raise ConfigError("bad command line (see the usage error above)") from e


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
        raise ConfigError(f"Megatron refuses these arguments: {e}".splitlines()[0]) from None
    _check_schedule(args)
    return args, warnings


def _check_schedule(args: argparse.Namespace) -> None:
    """What Megatron would only assert after building the model."""
    if args.train_iters is not None:
        decay = args.lr_decay_iters or args.train_iters
        warmup = args.lr_warmup_iters or int((args.lr_warmup_fraction or 0) * decay)
        if warmup >= decay:
            raise ConfigError(f"the LR warm-up ({warmup} iterations) must be shorter than the decay "
                              f"({decay}: --lr-decay-iters, default --train-iters); lower --lr-warmup-iters")


def _check_before_start(args: argparse.Namespace) -> None:
    """A checkpoint to resume from must hold this architecture (one line naming the first difference)."""
    from xlstm_megatron.runs.checkpoint import check_architecture, iteration_dir, latest_iteration

    if args.load and not args.finetune:
        it = latest_iteration(args.load)
        if it is not None:
            check_architecture(iteration_dir(args.load, it), args)


def _worker(argv: list[str]) -> None:
    """One rank: Megatron's global state from the same argument list, then `pretrain()`."""
    from megatron.training.global_vars import set_global_variables

    from xlstm_megatron.compat import pretrain_context
    from xlstm_megatron.runs.args import architecture_line
    from xlstm_megatron.runs.launch import launch_env, prepare_device, shutdown_parallel
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
    shutdown_parallel()  # leave the process as it was (one-process runs go on to write the report here)


def train_main(cli: list[str], sample_text: Callable[[str, str, int, int], str] | None = None) -> int:
    """The command; `sample_text` (from the inference tier, wired by the CLI) writes the text sample."""
    from xlstm_megatron.runs.launch import launch_env, run_processes

    # Megatron-LM's launch scripts export this (TP/CP on Hopper and older need it); the ranks inherit it
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    try:  # everything that can be checked before a process starts or a byte is written
        env = launch_env()
        argv = build_argv(cli)
        probe, _ = _parse(argv)  # unvalidated: only the world size and the data flags are read from it
        world = env.world_size if env.launched else probe.nproc
        argv = _prepare_data(probe, argv)
        args, _ = parse_run_args(argv, world_size=world)
        _check_before_start(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if env.launched:
        _worker(argv)
        if env.rank != 0:
            return 0
    else:
        run_processes(_worker, args.nproc, args=(argv,))
    from xlstm_megatron.training.report import write_report

    write_report(args, sample_text)
    return 0

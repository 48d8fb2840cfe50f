"""`xlstm-megatron`: the console command (train, preprocess, generate, convert)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

USAGE = """usage: xlstm-megatron <command> [options]

commands:
  train       train an xLSTM (YAML config + Megatron-style flags; torchrun, srun, or --nproc N here)
  preprocess  jsonl / text files -> Megatron indexed dataset (.bin/.idx)
  generate    continue a prompt from a checkpoint with constant-memory recurrent decoding
  convert     Hugging Face xLSTM <-> Megatron dist checkpoint; official `xlstm` v1 -> Megatron

`xlstm-megatron <command> --help` lists the options of a command."""


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _train_worker(model_kwargs: dict[str, Any], run: Any, sources: Any) -> None:
    import torch

    from xlstm_megatron.data.errors import DataConfigError
    from xlstm_megatron.training.batches import resolve_data_sources
    from xlstm_megatron.training.distributed import init_worker, shutdown_worker
    from xlstm_megatron.training.run_config import ConfigError, dump_run_config
    from xlstm_megatron.training.trainer import train

    env = init_worker(run)
    if sources is None:  # under torchrun/srun: rank 0 prepares the data, the others wait for its answer (or error)
        box: list[Any] = [None]
        if env.rank == 0:
            try:
                box = [resolve_data_sources(run)]
            except (ConfigError, DataConfigError) as e:
                box = [str(e)]
        torch.distributed.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            if env.rank == 0:
                _fail(box[0])
            raise SystemExit(2)
        sources = box[0]
    if env.rank == 0 and run.save:
        Path(run.save).mkdir(parents=True, exist_ok=True)
        (Path(run.save) / "run_config.yaml").write_text(dump_run_config(model_kwargs, run))
    summary = train(model_kwargs, run, sources)
    if env.rank == 0 and run.save:
        (Path(run.save) / "summary.json").write_text(json.dumps(summary, indent=1))
    shutdown_worker()


def train_main(argv: list[str]) -> int:
    from xlstm_megatron.data.errors import DataConfigError
    from xlstm_megatron.training import checkpoint as ckpt
    from xlstm_megatron.training.batches import padded_vocab_size, resolve_data_sources
    from xlstm_megatron.training.distributed import check_world, launch_env, run_processes
    from xlstm_megatron.training.run_config import ConfigError, add_run_args, load_run_config
    from xlstm_megatron.training.trainer import build_model_config

    parser = add_run_args(argparse.ArgumentParser(prog="xlstm-megatron train"))
    args = parser.parse_args(argv)
    try:  # everything that can be checked before a process starts or a byte is written
        model_kwargs, run = load_run_config(args)
        env = launch_env()
        check_world(run, env.world_size if env.launched else run.nproc)
        config = build_model_config(model_kwargs, run)
        sources = None
        if not env.launched:
            sources = resolve_data_sources(run)
            vocab = padded_vocab_size(run, sources.tokenizer.load() if sources.tokenizer else None)
            root = ckpt.resume_root(run.save, run.load)
            resume = ckpt.latest_iteration(root)
            if resume is not None:  # a checkpoint of another architecture fails here, before anything is written
                ckpt.check_architecture(ckpt.iteration_dir(root, resume), ckpt.architecture(config, vocab))
    except (ConfigError, DataConfigError) as e:
        return _fail(str(e))
    if env.launched:
        _train_worker(model_kwargs, run, None)
    else:
        run_processes(_train_worker, run.nproc, args=(model_kwargs, run, sources))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command == "preprocess":
        from xlstm_megatron.data.preprocess import preprocess_main

        return preprocess_main(rest)
    if command == "convert":
        from xlstm_megatron.convert.cli import convert_main

        return convert_main(rest)
    if command == "generate":
        from xlstm_megatron.inference.cli import generate_main

        return generate_main(rest)
    return _fail(f"unknown command {command!r}; see `xlstm-megatron --help`")


if __name__ == "__main__":
    sys.exit(main())

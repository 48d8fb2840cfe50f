"""Process start-up shared by every command: torchrun / Slurm environments, an embedded launcher for `--nproc N`
on one machine, and joining a process group with Megatron's parallel state for the commands that do not go through
Megatron's `pretrain()` (generation, conversion, benchmarks).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from xlstm_megatron.runs.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launched: bool
    """True under torchrun / srun (the environment says who we are); False when we start the processes."""


def launch_env() -> LaunchEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or srun exporting the torchrun variables)
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), True)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:  # srun, one task per GPU
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise ConfigError("under srun set MASTER_ADDR (e.g. the first host of `scontrol show hostnames`)")
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), True)
    return LaunchEnv(0, 1, 0, False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    from xlstm_megatron.compat.quiet import quiet_known_warnings

    quiet_known_warnings()  # a spawned rank starts with default warning filters
    # A spawned rank inherits "spawn" as its default start method; give its own subprocesses (data-loader workers,
    # checkpoint writers) the platform default that ranks started by torchrun have.
    multiprocessing.set_start_method("fork" if sys.platform == "linux" else "spawn", force=True)
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    fn(*args)


def run_processes(fn: Callable[..., Any], nproc: int, args: tuple = ()) -> None:
    """Run `fn(*args)` in `nproc` local processes with torchrun's environment (one process: in this one)."""
    if nproc == 1:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        fn(*args)
        return
    torch.multiprocessing.spawn(_spawned, args=(nproc, _free_port(), fn, args), nprocs=nproc, join=True)


def prepare_device() -> str:
    """Pick this process's GPU, or install Megatron's CPU shims and share the cores between local processes;
    returns the process-group backend for this machine."""
    from xlstm_megatron.compat import enable_megatron_cpu_compat

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return "nccl"
    enable_megatron_cpu_compat()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    return "gloo"


def init_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    seed: int = 1234,
) -> LaunchEnv:
    """Join the process group and initialise Megatron's parallel state and RNG streams (once per process), for the
    commands that run outside `pretrain()`."""
    from megatron.core import parallel_state as ps

    from xlstm_megatron.compat import model_parallel_manual_seed

    env = launch_env()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if env.world_size % (tp * pp):
        raise ConfigError(f"{env.world_size} processes cannot hold TP={tp} x PP={pp}; use a multiple of {tp * pp}")
    backend = prepare_device()
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=30))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    model_parallel_manual_seed(seed)
    return env


def shutdown_parallel() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()

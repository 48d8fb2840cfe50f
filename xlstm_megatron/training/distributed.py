"""Process start-up: torchrun / Slurm environments, or an embedded launcher for `--nproc N` on one machine.

The same worker code runs in all three cases: it joins the process group (NCCL with GPUs, gloo on CPU), installs
Megatron's CPU shims when CUDA is absent and initialises Megatron's parallel state.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from xlstm_megatron.training.run_config import ConfigError, RunConfig


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
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), True)
    return LaunchEnv(0, 1, 0, False)


def check_world(run: RunConfig, world_size: int) -> None:
    """Every layout check that needs the world size, before any process group exists."""
    from xlstm_megatron.training.batches import num_microbatches

    tp, pp = run.tensor_model_parallel_size, run.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(
            f"{world_size} processes cannot hold TP={tp} x PP={pp}; use a multiple of {tp * pp} processes (--nproc)"
        )
    n = num_microbatches(run, world_size // (tp * pp))  # also checks the global batch divides
    if run.sequence_parallel and tp > 1 and run.seq_length % tp:
        raise ConfigError(f"sequence parallel needs seq_length={run.seq_length} divisible by TP={tp}")
    if run.virtual_pipeline_model_parallel_size and (pp < 2 or n % pp):
        raise ConfigError(
            f"virtual pipeline stages need PP >= 2 and microbatches ({n}) divisible by PP={pp}; "
            "raise --global-batch-size"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
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


def init_worker(run: RunConfig) -> LaunchEnv:
    """Join the process group and initialise Megatron's parallel state and RNG streams (call once per process)."""
    from megatron.core import parallel_state as ps

    from xlstm_megatron.compat import enable_megatron_cpu_compat, model_parallel_manual_seed

    env = launch_env()
    check_world(run, env.world_size)
    cuda = torch.cuda.is_available()
    backend = run.distributed_backend if run.distributed_backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        enable_megatron_cpu_compat()
        # Share the cores between the local processes instead of oversubscribing them.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=30))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=run.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=run.virtual_pipeline_model_parallel_size,
    )
    model_parallel_manual_seed(run.seed)
    return env


def shutdown_worker() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()

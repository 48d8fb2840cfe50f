"""Multi-process test harness: run a function on N real gloo ranks with Megatron's parallel state initialised.

API
---
``run_distributed(fn, world_size=2, *, tp=1, pp=1, vpp=None, cp=1, ep=1, args=(), kwargs=None, seed=1234,
timeout=120.0, init_model_parallel=True, parallel_kwargs=None, backend="gloo") -> list``
    Starts ``world_size`` processes. Each one sets ``torch.set_num_threads(1)``, enables the Megatron CPU shims
    (``xlstm_megatron.compat``; a no-op with CUDA), joins a ``backend`` process group (torchrun-style env:
    ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), calls
    ``parallel_state.initialize_model_parallel(tp, pp, vpp, context_parallel_size=cp,
    expert_model_parallel_size=ep, **parallel_kwargs)`` and ``model_parallel_manual_seed(seed)``, then runs
    ``fn(*args, **kwargs)``. Returns the per-rank return values, index = global rank; tensors (also inside
    dicts/lists/tuples) come back detached on CPU; any ``torch.save``-able value works.
    ``init_model_parallel=False`` stops after the process group.

    ``fn`` and ``args`` must be picklable: ``fn`` is a module-level function (of a test module, say), never a lambda or
    a closure. Inside ``fn``, use ``torch.distributed`` / ``megatron.core.parallel_state`` as usual, build configs with
    ``**cpu_config_overrides()``, and call ``reinit_model_parallel(tp=..., pp=..., vpp=..., seed=...)`` to switch to
    another layout in the same processes (milliseconds, against ~1 s for a new start), e.g. compute a TP=2 result and
    then the TP=1 reference on the same ranks. A DP=1 reference needs its own ``world_size=1`` run.

Failures
    ``RankFailedError`` (a ``RuntimeError``; ``.rank``, ``.remote_traceback``) when a rank raises or dies: the message
    holds the traceback of the rank that failed first and the tail of every rank's output (a rank's stdout/stderr go
    to a log file, not to the terminal); the other ranks are killed at once (no hang in a collective).
    ``DistributedTimeoutError`` (a ``TimeoutError``) after ``timeout`` seconds: every live rank first dumps its Python
    stacks (faulthandler) into its output, whose tails go into the message, then all ranks are killed. Each rank runs
    in its own process group, so processes it started (Megatron's checkpoint writer) die with it.

Mechanics
    On CPU, ranks are forked from a ``forkserver`` that imports torch and Megatron once per test session (the first
    start pays that, ~5 s; later starts ~0.3-1 s). With CUDA, ranks are spawned (CUDA does not survive a fork). The
    rendezvous ``TCPStore`` is hosted by the parent on a port the OS picks (no free-port race). Ranks re-import the
    parent's ``__main__``: call from tests, or from scripts with an ``if __name__ == "__main__":`` guard. Import this
    module as ``tests.megatron.dist`` (``python -m pytest`` from the repo root puts it on ``sys.path``). Megatron
    traps worth knowing when writing such tests are listed in ``patches/README.md``.

Example::

    from tests.megatron.dist import run_distributed

    def _allreduce_rank():  # module level
        t = torch.tensor([float(torch.distributed.get_rank())])
        torch.distributed.all_reduce(t)
        return t

    def test_allreduce():
        assert [r.item() for r in run_distributed(_allreduce_rank, world_size=2)] == [1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

_PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.pipeline_parallel",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.dist_checkpointing",
    "xlstm_megatron.compat.megatron_cpu",
]
_LOG_TAIL_LINES = 40


class RankFailedError(RuntimeError):
    """A rank raised or died; ``rank`` is the first one that failed, ``remote_traceback`` its traceback text."""

    def __init__(self, message: str, rank: int, remote_traceback: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


class DistributedTimeoutError(TimeoutError):
    """The ranks did not all finish within the timeout (message includes their stack dumps)."""


@dataclass(frozen=True)
class _WorkerSpec:
    workdir: str
    world_size: int
    port: int
    backend: str
    timeout: float
    init_model_parallel: bool
    parallel: dict[str, Any] = field(default_factory=dict)
    seed: int = 1234


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    cp: int = 1,
    ep: int = 1,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    seed: int = 1234,
    timeout: float = 120.0,
    init_model_parallel: bool = True,
    parallel_kwargs: dict[str, Any] | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return each rank's result (see the module doc)."""
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(f"world_size={world_size} is not a multiple of tp*pp*cp={tp * pp * cp}")
    workdir = tempfile.mkdtemp(prefix="xlstm_dist_")
    try:
        try:
            torch.save((fn, tuple(args), dict(kwargs or {})), os.path.join(workdir, "payload.pt"))
        except Exception as e:  # pickling: lambdas, closures, local functions
            raise TypeError(f"run_distributed: fn/args must be picklable (module-level function): {e}") from e
        store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=timeout), wait_for_workers=False)
        parallel = dict(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            context_parallel_size=cp,
            expert_model_parallel_size=ep,
            **(parallel_kwargs or {}),
        )
        spec = _WorkerSpec(workdir, world_size, store.port, backend, timeout, init_model_parallel, parallel, seed)
        ctx = _mp_context()
        procs = [ctx.Process(target=_worker_main, args=(r, spec), name=f"dist-rank{r}") for r in range(world_size)]
        try:
            for p in procs:
                p.start()
            _wait(procs, spec)
            return [_load_result(workdir, rank)["ok"] for rank in range(world_size)]
        finally:
            _kill(procs)
            del store
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def reinit_model_parallel(
    tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234, **parallel_kwargs: Any
) -> None:
    """Inside a worker: destroy Megatron's parallel state, initialise another layout on the same ranks, and reseed
    (``model_parallel_manual_seed(seed)``)."""
    from megatron.core import parallel_state as ps

    from xlstm_megatron.compat import model_parallel_manual_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        **parallel_kwargs,
    )
    model_parallel_manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# parent side


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver with torch and Megatron preloaded; spawn with CUDA, because Megatron's import may initialise CUDA
    in the server, and CUDA does not survive a fork."""
    if torch.cuda.is_available():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _result_path(workdir: str, rank: int) -> str:
    return os.path.join(workdir, f"result{rank}.pt")


def _log_path(workdir: str, rank: int) -> str:
    return os.path.join(workdir, f"rank{rank}.log")


def _load_result(workdir: str, rank: int) -> dict[str, Any] | None:
    path = _result_path(workdir, rank)
    return torch.load(path, weights_only=False) if os.path.exists(path) else None


def _log_tails(workdir: str, world_size: int) -> str:
    parts = []
    for rank in range(world_size):
        try:
            with open(_log_path(workdir, rank), errors="replace") as f:
                lines = f.read().splitlines()[-_LOG_TAIL_LINES:]
        except FileNotFoundError:
            lines = ["<no output>"]
        parts.append(f"----- rank {rank} output (last {_LOG_TAIL_LINES} lines) -----\n" + "\n".join(lines))
    return "\n".join(parts)


def _wait(procs: list, spec: _WorkerSpec) -> None:
    """Return when every rank exited cleanly; raise on the first failure or at the deadline."""
    deadline = time.monotonic() + spec.timeout
    while True:
        failed = [rank for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            _kill(procs)
            # Report the rank that failed first: the others often fail in a collective because of it.
            reported = [r for r in failed if os.path.exists(_result_path(spec.workdir, r))]
            if reported:
                rank = min(reported, key=lambda r: os.path.getmtime(_result_path(spec.workdir, r)))
                tb = _load_result(spec.workdir, rank)["error"]
                msg = f"rank {rank} raised:\n{tb}"
            else:
                rank = failed[0]
                tb = msg = f"rank {rank} died with exit code {procs[rank].exitcode} before reporting a result"
            raise RankFailedError(f"{msg}\n{_log_tails(spec.workdir, spec.world_size)}", rank, tb)
        if all(p.exitcode == 0 for p in procs):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            alive = [rank for rank, p in enumerate(procs) if p.exitcode is None]
            for rank in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(procs[rank].pid, signal.SIGUSR1)  # faulthandler: dump the stacks into the log
            time.sleep(1.0)
            _kill(procs)
            raise DistributedTimeoutError(
                f"ranks {alive} still running after {spec.timeout:.0f} s\n{_log_tails(spec.workdir, spec.world_size)}"
            )
        multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=min(left, 0.5))


def _signal_group(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    for target in (lambda: os.killpg(pid, sig), lambda: os.kill(pid, sig)):
        try:
            target()
            return
        except (ProcessLookupError, PermissionError):
            continue


def _kill(procs: list) -> None:
    for p in procs:
        if p.pid is not None:
            _signal_group(p.pid, signal.SIGKILL)  # the rank's process group: the rank and what it started
    for p in procs:
        if p.pid is not None:
            p.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------------------
# worker side


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_to_cpu(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _save_atomic(obj: Any, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _worker_main(rank: int, spec: _WorkerSpec) -> None:
    os.setpgrp()
    log = open(_log_path(spec.workdir, rank), "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(spec.port),
        RANK=str(rank),
        WORLD_SIZE=str(spec.world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(spec.world_size),
        CUDA_DEVICE_MAX_CONNECTIONS="1",
    )
    try:
        from megatron.core import parallel_state as ps

        from xlstm_megatron.compat import enable_megatron_cpu_compat, model_parallel_manual_seed

        enable_megatron_cpu_compat()
        if torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        timeout = datetime.timedelta(seconds=spec.timeout)
        store = dist.TCPStore("127.0.0.1", spec.port, spec.world_size, False, timeout)
        dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world_size, timeout=timeout)
        try:
            if spec.init_model_parallel:
                ps.initialize_model_parallel(**spec.parallel)
                model_parallel_manual_seed(spec.seed)
            fn, args, kwargs = torch.load(os.path.join(spec.workdir, "payload.pt"), weights_only=False)
            result = _to_cpu(fn(*args, **kwargs))
            _save_atomic({"ok": result}, _result_path(spec.workdir, rank))
        finally:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            dist.destroy_process_group()
    except BaseException:
        _save_atomic({"error": traceback.format_exc()}, _result_path(spec.workdir, rank))
        log.flush()
        os._exit(1)

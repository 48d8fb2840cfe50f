"""Faults in `xlstm-megatron train` runs (Megatron's `pretrain()` over two real gloo ranks, `--nproc 2`):

- a NaN in the loss or in the gradients (injected with `XLSTM_MEGATRON_INJECT_NAN`, training/engine.py) stops the
  run with exit status 2 and one line naming the iteration and the intact last checkpoint;
- a rank SIGKILLed in the middle of a checkpoint save leaves the previous checkpoint the latest, and the job
  resumes from it; SIGTERM with `--exit-signal-handler` saves and exits 0; the run continued after both equals the
  uninterrupted one bitwise (losses and model tensors).

docs/faults.md has the policy. One uninterrupted reference run serves every comparison."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.training.engine_runs import BASE, model_tensors, train

SAVE_EVERY_2 = ("--save-interval", "2")
LATEST = "latest_checkpointed_iteration.txt"


def _latest(run: Path) -> str | None:
    marker = run / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def _command(run: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "xlstm_megatron.cli", "train", *BASE, *SAVE_EVERY_2, "--save", str(run),
            "--nproc", "2", *flags]


def _start(run: Path, log: Path, *flags: str) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - the run writes to it until it ends
    return subprocess.Popen(_command(run, *flags), stdout=out, stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The launcher's rank processes (not multiprocessing's resource tracker)."""
    return [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = model_tensors(a), model_tensors(b)
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run (checkpoints at 2, 4, 6)."""
    run = tmp_path_factory.mktemp("full") / "run"
    return run, train(run, *SAVE_EVERY_2, nproc=2)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """One run taken through both faults: a rank SIGKILLed while iteration 4 is being saved, a resume that gets
    SIGTERM, and a resume to the end."""
    root = tmp_path_factory.mktemp("faults")
    run, facts = root / "run", {}

    # 1. Freeze the job as soon as the save of iteration 4 has begun (its directory exists), kill one rank.
    proc = _start(run, root / "killed.log")
    _wait_for(lambda: (run / "iter_0000004").is_dir(), proc, "the save of iteration 4")
    tree = psutil.Process(proc.pid).children(recursive=True)
    for p in tree:
        p.suspend()
    facts["latest_during_save"] = _latest(run)
    ranks = _ranks(proc)
    ranks[-1].kill()
    for p in tree:
        if p.is_running():
            p.resume()
    facts["killed_rc"] = proc.wait(timeout=300)
    facts["half_written_complete"] = (run / "iter_0000004" / "metadata.json").is_file()
    facts["latest_after_kill"] = _latest(run)

    # 2. Resume; SIGTERM the launcher (as torchrun/srun deliver it) once iteration 3 is logged.
    log = root / "sigterm.log"
    proc = _start(run, log, "--exit-signal-handler")
    _wait_for(lambda: "iteration        3/" in log.read_text(), proc, "iteration 3")
    proc.send_signal(signal.SIGTERM)
    facts["sigterm_rc"] = proc.wait(timeout=300)
    facts["sigterm_log"] = log.read_text()
    facts["latest_after_sigterm"] = _latest(run)

    # 3. Resume to the end.
    facts["history"] = train(run, *SAVE_EVERY_2, nproc=2)
    facts["run"] = run
    return facts


def test_rank_killed_during_save_keeps_the_previous_checkpoint(interrupted):
    from xlstm_megatron.runs.checkpoint import check_checkpoint_files, latest_iteration

    assert interrupted["latest_during_save"] == "2", "the job was frozen after the save of iteration 4 finished"
    assert interrupted["killed_rc"] != 0
    assert interrupted["latest_after_kill"] == "2"  # the marker never named the half-written iter_0000004
    assert not interrupted["half_written_complete"]
    assert "successfully loaded checkpoint from" in interrupted["sigterm_log"]
    assert "at iteration 2" in interrupted["sigterm_log"]  # the job resumed from the previous checkpoint
    assert latest_iteration(interrupted["run"]) == 6
    check_checkpoint_files(interrupted["run"] / "iter_0000004")  # rewritten complete by the resumed run


def test_sigterm_saves_and_exits_zero(interrupted):
    assert interrupted["sigterm_rc"] == 0, interrupted["sigterm_log"][-3000:]
    stopped = int(interrupted["latest_after_sigterm"])
    assert 3 <= stopped < 6  # saved where it stopped, before the end
    assert "exiting program after receiving SIGTERM" in interrupted["sigterm_log"]


def test_resumed_after_kill_and_sigterm_equals_uninterrupted_bitwise(interrupted, full):
    run, history = full
    assert interrupted["history"]["train"] == history["train"]  # exact floats, iterations 1..6
    assert interrupted["history"]["valid"] == history["valid"]
    assert _same_tensors(interrupted["run"] / "iter_0000006", run / "iter_0000006")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_nan_in_loss_then_in_gradients_stops_with_one_line(tmp_path, full):
    from xlstm_megatron.training.engine import INJECT_NAN_ENV

    run = tmp_path / "run"
    env = {**os.environ, INJECT_NAN_ENV: "loss@3"}
    proc = subprocess.run(_command(run), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("error: NaN in the loss at iteration 3 ")
    assert "the last checkpoint (iteration 2" in lines[0] and "--iterations-to-skip 3" in lines[0]
    assert _latest(run) == "2" and not (run / "iter_0000003").exists()
    assert _same_tensors(run / "iter_0000002", full[0] / "iter_0000002")  # intact: the uninterrupted run's

    # The same command resumes from iteration 2; now the gradients of iteration 4 are NaN (the loss is finite).
    env[INJECT_NAN_ENV] = "grad@4"
    proc = subprocess.run(_command(run), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("error: NaN in the gradients at iteration 4 ")
    assert "the last checkpoint (iteration 2" in lines[0]
    assert _latest(run) == "2" and not (run / "iter_0000004").exists()

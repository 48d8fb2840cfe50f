"""Shared by the Triton kernel tests: run a test module's cases in a subprocess under `TRITON_INTERPRET=1` (the
variable must be set before triton is imported, so the rest of the suite stays unaffected), record which exception
type each bad call raises, and check the import guard without triton (ahead-of-time compiles: kernel_resources.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_worker_in_interpreter(test_file: str, cases: dict, timeout: int) -> dict:
    """Runs `python <test_file> --worker` with the cases as JSON on stdin; returns the JSON on its last stdout line."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # `tests.` imports
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, test_file, "--worker"], input=json.dumps(cases), capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def raised_types(calls: dict[str, Callable[[], object]]) -> dict[str, str | None]:
    """Exception type name raised by each call (None if it returned)."""
    out: dict[str, str | None] = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - the type is the result
            out[name] = type(exc).__name__
    return out


_GUARD_SCRIPT = r"""
import sys
import xlstm_megatron.ops
assert "{package}" not in sys.modules, "the torch path must not import the Triton package"
sys.modules["triton"] = None  # triton not installed
from {package} import TRITON_AVAILABLE, {function}
assert not TRITON_AVAILABLE
try:
    {function}()
except ImportError:
    print("guarded")
"""


def assert_guarded_without_triton(package: str, function: str) -> None:
    """`import xlstm_megatron.ops` leaves the Triton `package` unimported, and without triton the package imports
    with TRITON_AVAILABLE false and `function` raises ImportError."""
    script = _GUARD_SCRIPT.format(package=package, function=function)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "guarded" in proc.stdout, proc.stderr[-4000:]

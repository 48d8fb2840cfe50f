"""Shared by the Triton kernel tests: run a test module's cases in a subprocess under `TRITON_INTERPRET=1` (the
variable must be set before triton is imported, so the rest of the suite stays unaffected), and record which
exception type each bad call raises."""

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

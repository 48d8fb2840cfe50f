"""The quiet start silences only the warnings it names: Megatron's compile-time SyntaxWarning on a fresh install
(no .pyc yet, the first error a user sees must stay one line), while the same warning from other code still prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from xlstm_megatron.compat.quiet import quiet_known_warnings
quiet_known_warnings()
import {package}.bad_escape
"""


def _compile_warnings(tmp_path: Path, package: str) -> str:
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "bad_escape.py").write_text('DOC = "a \\- b"\n')  # '\-' is an invalid escape
    proc = subprocess.run([sys.executable, "-B", "-c", _PROBE.format(package=package), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stderr


def test_megatron_source_syntax_warning_is_silenced(tmp_path):
    assert _compile_warnings(tmp_path, "megatron") == ""


def test_other_source_syntax_warning_still_prints(tmp_path):
    assert "SyntaxWarning: invalid escape sequence" in _compile_warnings(tmp_path, "someone_else")

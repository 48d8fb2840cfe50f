#!/usr/bin/env bash
# The README's test command: installs everything the tests need, lints, and runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh test
# The DeepSpeed engine's tests (an optional extra): its sdist needs the venv's setuptools (--no-build-isolation);
# installed once, then a fast check. Its first use compiles a small CPU op (~25 s, cached in ~/.cache/torch_extensions).
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)" ||
    .venv/bin/python -m pip install -q --no-build-isolation -c constraints.txt "deepspeed>=0.19,<0.20"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"

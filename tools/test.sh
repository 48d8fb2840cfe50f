#!/usr/bin/env bash
# The README's test command: installs everything the tests need, lints, and runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Creates .venv with a Python 3.12 interpreter (megatron-core >= 0.17 needs it) and installs the package.
# Usage: tools/bootstrap.sh [extra]   e.g. "test". Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"

find_python312() {
    local c
    for c in "${PYTHON:-}" python3.12 python3; do
        [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then command -v "$c"; return; fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        for c in "$(pyenv root)"/versions/3.12*/bin/python3; do [ -x "$c" ] && { echo "$c"; return; }; done
    fi
    for c in /usr/bin/python3.12 /usr/local/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3; do
        [ -x "$c" ] && { echo "$c"; return; }
    done
    return 1
}

if [ ! -x .venv/bin/python ]; then
    py=$(find_python312) || { echo "error: no Python 3.12 found; install one (pyenv install 3.12) or set PYTHON=/path/to/python3.12" >&2; exit 1; }
    echo "[bootstrap] creating .venv with $py"
    "$py" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.installed${extra:+-$extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "[bootstrap] installing xlstm-megatron${extra:+[$extra]} into .venv (first run: 1-3 minutes)"
    # constraints.txt pins the versions CI tested, so a later install gets the same torch / megatron-core / ...
    # uv (from PyPI) unpacks the ~6 GB of torch + CUDA wheels in parallel: about 1 min where pip takes 2-3. uv does
    # not read pip.conf, so where it cannot reach an index (a mirror configured for pip only) pip installs instead.
    # --compile-bytecode (pip's default, not uv's): with PYTHONDONTWRITEBYTECODE set, as on these machines, every
    # process would otherwise compile torch and Megatron from source at import (~3x slower starts, every test rank).
    target=(-c constraints.txt -e ".${extra:+[$extra]}")
    if ! { .venv/bin/python -m pip install -q uv >/dev/null 2>&1 &&
           VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip install -q --compile-bytecode "${target[@]}"; }; then
        .venv/bin/python -m pip install -q "${target[@]}"
    fi
    touch "$stamp"
fi

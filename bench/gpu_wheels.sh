#!/usr/bin/env bash
# Fetch (here, where pip reaches the registry) the wheels the GPU image lacks into .whl/ (git-ignored): megatron-core
# for the train-step bench, the official xlstm / mlstm_kernels for the baselines. Python 3.12, x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >>"$exclude"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl megatron-core==0.19.2 xlstm==2.0.6 mlstm_kernels==2.0.6
ls -l .whl

#!/usr/bin/env bash
# The prepared GPU check of the kernels issue, for a short lease on one H100/H200 (the workplace's device tool runs it
# in the repo root with $OUT set; elsewhere results go to bench/results/gpu_session/). Each stage has its own time
# limit and writes a log and its JSON under $OUT; a failing stage does not stop the next.
#
#   bash bench/gpu_session.sh [STAGE...]     STAGE: env tests mlstm slstm step   (default: all, ~9 min on an H100)
#
# Packages the GPU image lacks travel as wheels in .whl/ (git-ignored), fetched here beforehand with
#   bash bench/gpu_wheels.sh
# and are installed to /tmp/site first. The mLSTM bench runs with fixed tiles (XLSTM_MLSTM_TRITON_AUTOTUNE=0): the
# full autotuning sweep compiles ~200 kernel variants, more than a short lease holds; `tune` times the autotuned
# kernels on one shape for comparison.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "wheel install failed" >&2
fi

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}

run_stage() {
    case $1 in
        env) stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c \
'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'" ;;
        tests) stage tests 200 $PY -m pytest -q -p no:cacheprovider -k "gpu" \
            tests/ops/test_mlstm_triton.py tests/ops/test_slstm_triton.py tests/ops/test_kernel_dispatch.py ;;
        mlstm) XLSTM_MLSTM_TRITON_AUTOTUNE=0 stage mlstm 170 $PY bench/mlstm_kernels_gpu.py --seq-lens 2048 8192 65536 \
            --reps 5 --kept-states --out "$OUT/mlstm_kernels_gpu.json" ;;
        tune) stage tune 150 $PY bench/mlstm_kernels_gpu.py --seq-lens 8192 --heads 8x256x512 --chunks 64 \
            --impls "ours triton c64" --reps 5 --out "$OUT/mlstm_kernels_gpu_autotuned.json" ;;
        slstm) stage slstm 120 $PY bench/slstm_kernels_gpu.py --shapes 8x2048x4x192 16x1024x8x64 --reps 5 \
            --out "$OUT/slstm_kernels_gpu.json" ;;
        step) stage step 120 $PY bench/train_step.py --config configs/large/xlstm_7b.yaml --nproc 1 \
            --tensor-model-parallel-size 1 --no-sequence-parallel --num-layers 4 --global-batch-size 4 \
            --micro-batch-size 1 --distributed-backend nccl --steps 5 --warmup 2 --out "$OUT/train_step_large4.json" ;;
        *) echo "unknown stage $1 (env tests mlstm tune slstm step)" >&2; return 2 ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests mlstm slstm step)
for s in "${stages[@]}"; do run_stage "$s"; done

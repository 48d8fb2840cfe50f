#!/usr/bin/env bash
# The prepared GPU check of the kernels issue, for a short lease on one H100/H200 (the workplace's device tool runs it
# in the repo root with $OUT set; elsewhere results go to bench/results/gpu_session/). Each stage has its own time
# limit; all stages log to $OUT/session.log and each bench writes its JSON under $OUT after every shape, so a stage
# cut off by its limit keeps what it measured. A failing stage does not stop the next.
#
#   bash bench/gpu_session.sh [STAGE...]   STAGE: env tests mlstm tune slstm slstm_official step
#                                          (default: env tests mlstm slstm)
#
# Sized for a 15-minute device budget: two calls on the same warm machine, each well inside the tool's 600 s limit,
#   1) bash bench/gpu_session.sh                        (<= 8 min: env 30 s, tests 200 s (one autotuned case), mlstm
#                                                        150 s, slstm 100 s: ours at the paper's sLSTM heads)
#   2) bash bench/gpu_session.sh step slstm_official    (~5.5 min: the official CUDA sLSTM at two paper heads; its
#                                                        kernels build per head size, ~1 min each)
#   then `tune` (2 min) if the budget has room.
# Packages the GPU image lacks travel as wheels: run `bash bench/gpu_wheels.sh` here first (fills the git-ignored
# .whl/) and name `.whl` in the call's `carry`; they are installed to /tmp/site. Kernels run with fixed tiles
# (XLSTM_MLSTM_TRITON_AUTOTUNE=0): autotuning compiles ~60 variants per head shape, more than a lease holds for every
# shape; `tune` times the autotuned mLSTM kernels on the 7B head shape for comparison.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLSTM_MLSTM_TRITON_AUTOTUNE=0
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "wheel install failed" | tee -a "$LOG" >&2
else
    echo "no .whl/ wheels: megatron-core (step), xlstm and mlstm_kernels (baselines) will be missing" | tee -a "$LOG"
fi

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, append to the log, echo the stage's tail
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS start
    start=$(wc -l <"$LOG" 2>/dev/null || echo 0)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    tail -n +"$((start + 2))" "$LOG" | tail -n 30
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

run_stage() {
    case $1 in
        env) stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c \
'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'" ;;
        tests) stage tests 200 $PY -m pytest -q -p no:cacheprovider -k "gpu and not compile" \
            tests/ops/test_mlstm_triton.py tests/ops/test_slstm_triton.py tests/ops/test_kernel_dispatch.py ;;
        mlstm) stage mlstm 150 $PY bench/mlstm_kernels_gpu.py --seq-lens 2048 8192 65536 --reps 5 --kept-states \
            --out "$OUT/mlstm_kernels_gpu.json" ;;
        tune) XLSTM_MLSTM_TRITON_AUTOTUNE=1 stage tune 120 $PY bench/mlstm_kernels_gpu.py --seq-lens 8192 \
            --heads 8x256x512 --chunks 64 --impls "ours triton c64" --reps 5 --out "$OUT/mlstm_kernels_gpu_tuned.json" ;;
        slstm) stage slstm 100 $PY bench/slstm_kernels_gpu.py --impls "ours triton" "ours torch" "ours triton steps" \
            --mlstm-ratio none --warmup 2 --reps 3 \
            --shapes 8x2048x4x192 8x2048x4x256 8x2048x4x384 8x2048x4x512 8x2048x4x640 16x1024x8x64 \
            --out "$OUT/slstm_kernels_gpu.json" ;;
        slstm_official) stage slstm_official 190 $PY bench/slstm_kernels_gpu.py --warmup 2 --reps 3 \
            --impls "ours triton" "official cuda" --shapes 8x2048x4x192 8x2048x4x512 \
            --out "$OUT/slstm_kernels_gpu_official.json" ;;
        step) stage step 140 $PY bench/train_step.py --config configs/large/xlstm_7b.yaml --nproc 1 \
            --tensor-model-parallel-size 1 --no-sequence-parallel --num-layers 4 --global-batch-size 4 \
            --micro-batch-size 1 --distributed-backend nccl --steps 5 --warmup 2 --out "$OUT/train_step_large4.json" ;;
        *) echo "unknown stage $1 (env tests mlstm tune slstm slstm_official step)" >&2; return 2 ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests mlstm slstm)
for s in "${stages[@]}"; do run_stage "$s"; done

#!/usr/bin/env bash
# The main job: set up .venv on first use, then train a tiny xLSTM (mLSTM + sLSTM blocks) on Shakespeare on CPU,
# tensor-parallel over 2 gloo processes. Writes runs/demo/: checkpoints, loss_curve.png, tensorboard/, summary.json.
# Extra flags override the config, e.g. `bash launch/cpu_demo.sh --train-iters 100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/xlstm-megatron train --config configs/demo/shakespeare_v1_tp2_cpu.yaml "$@"

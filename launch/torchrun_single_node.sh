#!/usr/bin/env bash
# Train on one machine with torchrun, one process per GPU.
#
#   CONFIG=configs/v1/xlstm71_125m.yaml launch/torchrun_single_node.sh [--flag value ...]
#
# Extra arguments are `xlstm-megatron train` flags and override the YAML (e.g. --micro-batch-size 4 --save runs/x).
# Environment (defaults in brackets): CONFIG (required), GPUS_PER_NODE [all visible GPUs], MASTER_PORT [29500].
set -euo pipefail

CONFIG=${CONFIG:?set CONFIG to a YAML file, e.g. CONFIG=configs/v1/xlstm71_125m.yaml}
if [[ -z ${GPUS_PER_NODE:-} ]]; then
    GPUS_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
fi
if (( GPUS_PER_NODE < 1 )); then
    echo "no GPU found; set GPUS_PER_NODE, or on CPU run: xlstm-megatron train --config $CONFIG --nproc N" >&2
    exit 2
fi
MASTER_PORT=${MASTER_PORT:-29500}

# Megatron overlaps TP/SP communication with compute only if kernels are queued in order on one hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Triton compiles the mLSTM kernels on first use; a local cache avoids races on shared home directories.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-cache-${USER:-user}-$(hostname -s)}

exec torchrun \
    --nproc_per_node "$GPUS_PER_NODE" \
    --nnodes 1 \
    --master_addr localhost \
    --master_port "$MASTER_PORT" \
    --no-python \
    xlstm-megatron train --config "$CONFIG" "$@"

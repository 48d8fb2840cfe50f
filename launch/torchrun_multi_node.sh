#!/usr/bin/env bash
# Train on several machines with torchrun: run this once on every node, with the same MASTER_ADDR and MASTER_PORT
# and NODE_RANK = 0 .. NNODES-1.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 CONFIG=configs/large/xlstm_7b.yaml launch/torchrun_multi_node.sh [flags]
#
# Environment (defaults in brackets): CONFIG (required), NNODES [1], NODE_RANK [0], MASTER_ADDR [localhost],
# MASTER_PORT [29500], GPUS_PER_NODE [8]. NCCL_* variables already set in the environment are kept.
set -euo pipefail

CONFIG=${CONFIG:?set CONFIG to a YAML file, e.g. CONFIG=configs/large/xlstm_7b.yaml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# Megatron overlaps TP/SP communication with compute only if kernels are queued in order on one hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# InfiniBand settings of Megatron-LM's example scripts (service level, and a longer retry timeout for large jobs).
export NCCL_IB_SL=${NCCL_IB_SL:-1}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Per-node Triton cache on local disk: compiling into one shared (NFS) directory from many nodes races.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-cache-${USER:-user}-$(hostname -s)}

exec torchrun \
    --nproc_per_node "$GPUS_PER_NODE" \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    --no-python \
    xlstm-megatron train --config "$CONFIG" "$@"

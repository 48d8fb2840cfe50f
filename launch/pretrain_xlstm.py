#!/usr/bin/env python
"""Megatron-LM's `pretrain_gpt.py`, for xLSTM: drop it into a Megatron-LM checkout (or run it from here) and launch
it with your usual argument list plus `--spec xlstm_megatron.layers.specs xlstm_block_spec --xlstm-block large|v1`:

    torchrun --nproc_per_node 8 launch/pretrain_xlstm.py <your GPT arguments> \
        --spec xlstm_megatron.layers.specs xlstm_block_spec --xlstm-block large

It is `xlstm-megatron train`: Megatron's own `megatron.training.pretrain()` with the xLSTM providers (model config,
forward step, GPT datasets), every megatron.training flag with its usual meaning, the xLSTM family's architecture
applied to the arguments (docs/megatron_lm.md has the table), and all checks before any process starts.
"""

import sys

if __name__ == "__main__":
    from xlstm_megatron.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))

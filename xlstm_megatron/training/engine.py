"""Megatron's own training loop (`megatron.training.pretrain`) with the xLSTM model: the providers it calls and the
worker that runs it.

`pretrain()` does everything a training loop does (optimizer, schedule, microbatching, pipeline schedules,
evaluation, checkpoints, resume, logging, TensorBoard/W&B, NaN checks, signal handling, recompute, overlap, FSDP),
driven by Megatron's own arguments. The plugin only supplies what is xLSTM's: the model config (built from the
arguments by `runs.model`), a forward step and a dataset provider as Megatron-LM's `pretrain_gpt.py` has them.
"""

from __future__ import annotations

import os
from argparse import Namespace
from functools import partial
from typing import Any

import torch

DATA_KEYS = ("tokens", "labels", "loss_mask")

# Test-only fault injection (docs/faults.md): `XLSTM_MEGATRON_INJECT_NAN=loss@K` makes the loss of every microbatch of
# iteration K NaN, `grad@K` keeps the loss finite and makes the gradients flowing back from it NaN. Megatron's own
# `--error-injection-rate` only marks a validation as failed at random (and only in `--rerun-mode validate_results`);
# it never puts a NaN into the numbers, so it cannot show that the NaN checks see a real one.
INJECT_NAN_ENV = "XLSTM_MEGATRON_INJECT_NAN"


def _injected_nan_target(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    what, _, at = spec.partition("@")
    if what not in ("loss", "grad") or not at.isdigit():
        raise ValueError(f"{INJECT_NAN_ENV}={spec!r}: use loss@ITERATION or grad@ITERATION")
    return what, int(at)


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


def _maybe_inject_nan(loss: torch.Tensor, iteration: int) -> torch.Tensor:
    target = _injected_nan_target(os.environ.get(INJECT_NAN_ENV))
    if target is None or target[1] != iteration:
        return loss
    return loss * float("nan") if target[0] == "loss" else _NaNGrad.apply(loss)


def _get_batch(data_iterator: Any, vp_stage: int | None, documents: bool = False
               ) -> dict[str, torch.Tensor | None]:
    """This rank's microbatch: read on tensor-parallel rank 0 of the first/last pipeline stage, broadcast over TP
    (Megatron's `tensor_parallel.broadcast_data`); middle stages read nothing. Under context parallelism each rank
    keeps its two pieces of every sequence in Megatron's zigzag order (`get_batch_on_this_cp_rank`, as its attention
    CP); the xLSTM mixers pass state between the pieces (`ops.mlstm.context_parallel`). Under
    `--reset-attention-mask` (`documents`) the dataset's document mask comes along (`attention_mask`, else None)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.utils import get_batch_on_this_cp_rank
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return dict.fromkeys(DATA_KEYS)
    sample = next(data_iterator) if data_iterator is not None else None
    ints = tensor_parallel.broadcast_data(["tokens", "labels"], sample, torch.int64)
    floats = tensor_parallel.broadcast_data(["loss_mask"], sample, torch.float32)
    batch = {**ints, **floats, "attention_mask": None}
    if documents:  # packed documents: the mixers restart their state where the mask says
        batch.update(tensor_parallel.broadcast_data(["attention_mask"], sample, torch.bool))
    if ps.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=ps.get_context_parallel_group())
    return batch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sum of the masked per-token losses, the token count, and the report Megatron averages per token over the
    global batch (its 3-tuple convention)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    args = get_args()
    if INJECT_NAN_ENV in os.environ and torch.is_grad_enabled():  # training steps only, not evaluation
        loss = _maybe_inject_nan(loss, getattr(args, "curr_iteration", -1) + 1)  # the running iteration, 1-based
    if args.check_for_nan_in_loss_and_grad:
        machine = get_rerun_state_machine()
        for bad, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(result=loss, rejection_func=bad, message=f"found {what} in the forward loss",
                                    tolerance=0.0, fatal=True)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1).float()])}


def forward_step(data_iterator: Any, model: torch.nn.Module):
    """Megatron's forward-step contract: (per-token losses, loss function)."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args, get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = _get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"), get_args().reset_attention_mask)
    timers("batch-generator").stop()
    output = model(batch["tokens"], None, batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _dataset_built_on_rank(vp_stage: int | None = None) -> bool:
    from megatron.core import parallel_state as ps
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return is_first_or_last_pipeline_stage(vp_stage) and ps.get_tensor_model_parallel_rank() == 0


def datasets_provider(train_val_test_num_samples: list[int], vp_stage: int | None = None):
    """GPT datasets (indexed `.bin/.idx` blends or mock data) through megatron-core's builder, from the arguments."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        cls, train_val_test_num_samples, partial(_dataset_built_on_rank, vp_stage=vp_stage), config
    ).build()


datasets_provider.is_distributed = True  # every rank calls it (the builder has barriers); Megatron's own flag


def xlstm_floating_point_operations(args: Namespace, batch_size: int, *_: Any, **__: Any) -> float:
    """Training FLOPs of one global batch of the xLSTM model (`models.flops`, checked against torch's FLOP counter):
    what Megatron's throughput log (`--log-throughput`) and the checkpoints' `num_floating_point_operations_so_far`
    report. Megatron's own count is a Transformer's and would be wrong for these layers."""
    from xlstm_megatron.runs.model import train_flops_per_token_from_args

    key = (id(args), args.seq_length)
    if _FLOPS_PER_TOKEN.get("key") != key:  # either family (the Transformer baseline's count is causal attention's)
        _FLOPS_PER_TOKEN.update(key=key, value=train_flops_per_token_from_args(args))
    return float(_FLOPS_PER_TOKEN["value"] * batch_size * args.seq_length)


_FLOPS_PER_TOKEN: dict[str, Any] = {}


def run_pretrain(args: Namespace) -> None:
    """Run Megatron's `pretrain()` on validated arguments that are already Megatron's global args (inside
    `compat.pretrain_context()`)."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain, training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from xlstm_megatron.runs.model import model_config_from_args

    # No extension point for the model's FLOP count: Megatron calls this module function by name.
    training.num_floating_point_operations = xlstm_floating_point_operations
    cfg = pretrain_cfg_container_from_args(args, model_config_from_args(args))
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step)

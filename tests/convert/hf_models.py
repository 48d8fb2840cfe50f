"""Shared builders for the conversion tests: tiny random Hugging Face xLSTMs, conversions run in a one-process
Megatron worker, and our model built from a checkpoint's saved args (runs.model) with its weights loaded
(runs.checkpoint), its logits and its loss through Megatron's pipeline schedule."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch


@contextlib.contextmanager
def hf_fused_init_workaround() -> Iterator[None]:
    """transformers 5.24 cannot build or load a weight_mode='fused' xLSTM: `_init_weights` subtracts a [2 NH] bias
    from an [NH] slice (RuntimeError). Every weight is random or loaded here, so skip its init."""
    from transformers.models.xlstm.modeling_xlstm import xLSTMPreTrainedModel

    with mock.patch.object(xLSTMPreTrainedModel, "_init_weights", lambda self, module: None):
        yield


def load_hf(path: Path):
    from transformers import xLSTMForCausalLM

    with hf_fused_init_workaround():
        return xLSTMForCausalLM.from_pretrained(path, local_files_only=True).eval()


def random_hf_model(seed: int, **config: Any):
    """`xLSTMForCausalLM` with every parameter random (norms and gate biases too), in eval mode, fp32."""
    from transformers import xLSTMConfig, xLSTMForCausalLM

    torch.manual_seed(seed)
    with hf_fused_init_workaround():
        model = xLSTMForCausalLM(xLSTMConfig(autocast_kernel_dtype="float32", **config)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens, use_cache=False).logits.float()


def convert_in_worker(argvs: list[list[str]]) -> list[tuple[int, str]]:
    """Run `convert_main` on each argv inside a `run_distributed` worker; (exit code, stderr) per call."""
    from xlstm_megatron.convert.cli import convert_main

    results = []
    for argv in argvs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = convert_main(argv)
        results.append((rc, err.getvalue()))
    return results


def convert(*argvs: list[str]) -> list[tuple[int, str]]:
    from tests.megatron.dist import run_distributed

    return run_distributed(convert_in_worker, world_size=1, args=([list(map(str, a)) for a in argvs],),
                           init_model_parallel=False)[0]


def checkpoint_model(ckpt: Path, tp: int = 1, pp: int = 1) -> tuple[torch.nn.Module, dict[str, Any]]:
    """This rank's model chunk at TP/PP, built through runs.model from the checkpoint's saved args, with the latest
    checkpoint's weights loaded by runs.checkpoint (resharded); and the checkpoint's common state. Call in a
    run_distributed worker."""
    from megatron.core import parallel_state as ps

    from tests.megatron.dist import reinit_model_parallel
    from xlstm_megatron.runs import checkpoint as ckpt_io
    from xlstm_megatron.runs.model import build_xlstm_model

    reinit_model_parallel(tp=tp, pp=pp)
    path = ckpt_io.resolve_checkpoint_dir(ckpt)
    args = ckpt_io.with_layout(ckpt_io.saved_args(path), tp, pp)
    model = build_xlstm_model(args, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    ckpt_io.load_model_weights([model], path)
    return model, ckpt_io.common_state(path)


@torch.no_grad()
def schedule_loss(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean LM loss of one batch through Megatron's pipeline schedule (forward only): a float on the last pipeline
    stage, None on the others."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = output.float().mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, chunk):
        batch_tokens, batch_labels = next(data_iterator)
        return chunk(batch_tokens, None, None, labels=batch_labels), loss_func

    model.eval()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([(tokens, labels)]), model=[model], num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
    )
    return float(losses[0]["loss"]) if losses else None


@torch.no_grad()
def full_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] of a PP=1 model, gathered over the tensor-parallel vocabulary shards."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    return gather_from_tensor_model_parallel_region(model(tokens, None, None))

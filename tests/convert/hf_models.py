"""Shared builders for the conversion tests: tiny random Hugging Face xLSTMs, conversions run in a one-process
Megatron worker, and our model's logits loaded from a checkpoint through the trainer's own setup and loader."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml


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


def trainer_state(ckpt: Path, tp: int, pp: int, seq: int, load: bool = True, bf16: bool = False):
    """The trainer's TrainState for the run config of `ckpt` at TP/PP (distributed optimizer), with the checkpoint's
    latest iteration loaded by the trainer's loader. Call in a run_distributed worker."""
    from tests.megatron.dist import reinit_model_parallel
    from xlstm_megatron.training import checkpoint as ckpt_io
    from xlstm_megatron.training.batches import padded_vocab_size
    from xlstm_megatron.training.run_config import RunConfig
    from xlstm_megatron.training.trainer import setup

    reinit_model_parallel(tp=tp, pp=pp)
    doc = yaml.safe_load((ckpt / "run_config.yaml").read_text())
    train = {k: v for k, v in doc.get("train", {}).items() if k in ("vocab_size", "make_vocab_size_divisible_by")}
    run = RunConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, use_distributed_optimizer=True,
                    seq_length=seq, mock_data=True, micro_batch_size=2, lr=1e-3, min_lr=0.0, lr_warmup_iters=0,
                    bf16=bf16, **train)
    vocab = padded_vocab_size(run, None)
    state = setup(dict(doc["model"]), run, vocab)
    common = None
    if load:
        it = ckpt_io.latest_iteration(ckpt)
        common = ckpt_io.load_checkpoint(ckpt_io.iteration_dir(ckpt, it), state.inner, state.optimizer,
                                         state.scheduler, ckpt_io.architecture(state.config, vocab), True)
    return state, run, common


@torch.no_grad()
def full_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] of a PP=1 model, gathered over the tensor-parallel vocabulary shards."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    out = gather_from_tensor_model_parallel_region(model(tokens, None, None))
    model.train()
    return out


def zero_lr_step(state) -> None:
    """One optimizer step with zero gradients and lr 0: the parameters become the optimizer's main copies, which
    must equal the loaded weights (with bf16 those are separate fp32 copies; in fp32 they alias the parameters)."""
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    for group in state.optimizer.param_groups:
        group["lr"] = 0.0
    state.optimizer.step()

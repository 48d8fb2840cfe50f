"""The training program: model, optimizer and schedule from megatron-core, driven by a RunConfig.

One code path for CPU/gloo and GPU/NCCL, any TP x PP (x virtual PP) x DP layout.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xlstm_megatron.data.datasets import parse_split
from xlstm_megatron.layers.config import XLSTMConfig, make_xlstm_config
from xlstm_megatron.models.flops import train_flops_per_token
from xlstm_megatron.models.xlstm_model import XLSTMModel
from xlstm_megatron.training import checkpoint as ckpt
from xlstm_megatron.training.batches import (
    DataSources,
    TrainData,
    build_train_data,
    global_batch_size,
    microbatches,
    num_microbatches,
    padded_vocab_size,
)
from xlstm_megatron.training.reporting import Reporter, peak_tflops_per_device, plot_loss_curve
from xlstm_megatron.training.run_config import ConfigError, RunConfig


def build_model_config(model_kwargs: dict[str, Any], run: RunConfig) -> XLSTMConfig:
    """The XLSTMConfig of a run: the architecture plus this run's parallel layout and precision."""
    from xlstm_megatron.compat import cpu_config_overrides

    kwargs = dict(model_kwargs)
    block = kwargs.pop("xlstm_block", "large")
    dtype = torch.bfloat16 if run.bf16 else torch.float32
    layout = dict(
        tensor_model_parallel_size=run.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=run.virtual_pipeline_model_parallel_size,
        sequence_parallel=run.sequence_parallel and run.tensor_model_parallel_size > 1,
        pipeline_dtype=dtype,
        bf16=run.bf16,
        params_dtype=dtype,
    )
    if run.virtual_pipeline_model_parallel_size and run.pipeline_model_parallel_size == 2:
        # With PP=2 both neighbours are one rank: batched p2p in the interleaved schedule pairs the activation and
        # gradient messages in the wrong order and swaps them silently (megatron.training refuses this too).
        layout["batch_p2p_comm"] = False
    if not torch.cuda.is_available():
        if run.bf16:
            raise ConfigError("bf16 training needs a GPU; drop --bf16 on CPU")
        layout.update(cpu_config_overrides())
    if kwargs.get("fp8"):
        # TE checks each rank's GEMM input: the sequence shard under sequence parallelism (before its all-gather)
        seq = run.seq_length // run.tensor_model_parallel_size if layout["sequence_parallel"] else run.seq_length
        div = 32 if kwargs.get("fp8_recipe") == "mxfp8" else 8
        if (seq * run.micro_batch_size) % div:
            raise ConfigError(
                f"fp8: FP8 GEMMs need the tokens per rank (sequence {seq} x micro batch {run.micro_batch_size}) "
                f"divisible by {div}; change seq_length or micro_batch_size, or drop fp8"
            )
    try:
        return make_xlstm_config(block, **kwargs, **layout)
    except (ValueError, AssertionError) as e:  # Megatron's own config checks are assertions
        raise ConfigError(f"bad model config: {e}".splitlines()[0]) from None


@dataclass
class TrainState:
    model: list[torch.nn.Module]
    """DDP-wrapped chunks (one per virtual pipeline stage)."""
    inner: list[torch.nn.Module]
    """The same chunks unwrapped (what checkpoints and sampling use)."""
    optimizer: Any
    scheduler: Any
    config: XLSTMConfig
    vocab_size: int
    iteration: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def setup(model_kwargs: dict[str, Any], run: RunConfig, vocab_size: int) -> TrainState:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    config = build_model_config(model_kwargs, run)
    vpp = run.virtual_pipeline_model_parallel_size or 1
    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    inner: list[torch.nn.Module] = []
    for v in range(vpp):
        chunk: torch.nn.Module = XLSTMModel(
            config, vocab_size, run.seq_length, pre_process=pp_rank == 0 and v == 0,
            post_process=pp_rank == pp - 1 and v == vpp - 1,
            vp_stage=v if run.virtual_pipeline_model_parallel_size else None,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        if run.bf16:
            chunk = Float16Module(config, chunk)
        inner.append(chunk)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=run.use_distributed_optimizer, overlap_grad_reduce=False
    )
    model = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0) for i, chunk in enumerate(inner)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam", lr=run.lr, min_lr=run.min_lr, weight_decay=run.weight_decay, adam_beta1=run.adam_beta1,
        adam_beta2=run.adam_beta2, adam_eps=run.adam_eps, clip_grad=run.clip_grad, bf16=run.bf16,
        params_dtype=config.params_dtype, use_distributed_optimizer=run.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    gbs = global_batch_size(run, ps.get_data_parallel_world_size())
    decay_iters = run.lr_decay_iters or run.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=run.lr, min_lr=run.min_lr, lr_warmup_steps=run.lr_warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs, lr_decay_style=run.lr_decay_style, start_wd=run.weight_decay,
        end_wd=run.weight_decay, wd_incr_steps=run.train_iters * gbs, wd_incr_style="constant",
    )
    return TrainState(model, [_unwrap_ddp(m) for m in model], optimizer, scheduler, config, vocab_size)


def _unwrap_ddp(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "zero_grad_buffer") else module


# ---- steps --------------------------------------------------------------------------------------------------------

def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens = batch["tokens"] if batch is not None else None
    labels = batch["labels"] if batch is not None else None
    output = model(tokens, None, None, labels=labels)

    def loss_func(per_token: torch.Tensor):
        mask = batch["loss_mask"].float()
        loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"lm loss": loss.detach().clone()}  # the schedule scales the returned loss in place

    return output, loss_func


def _run_schedule(state: TrainState, run: RunConfig, batches: list, forward_only: bool) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(batches) for _ in state.model]
    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=state.model,
        num_microbatches=len(batches),
        seq_length=run.seq_length,
        micro_batch_size=run.micro_batch_size,
        forward_only=forward_only,
    )


def _mean_loss(losses: list[dict]) -> torch.Tensor:
    """Mean microbatch loss, averaged over DP and made known to every rank (only the last stage computes it)."""
    from megatron.core import parallel_state as ps

    value = torch.stack([d["lm loss"] for d in losses]).mean() if losses else torch.zeros(())
    value = value.float().to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
    value /= ps.get_data_parallel_world_size()
    torch.distributed.all_reduce(value, group=ps.get_pipeline_model_parallel_group())  # zero on other stages
    return value


def train_step(state: TrainState, run: RunConfig, data: TrainData) -> tuple[float, float, bool]:
    from megatron.core import parallel_state as ps

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    batches = list(microbatches(data.train, state.iteration, run, dp_rank, dp))
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = _run_schedule(state, run, batches, forward_only=False)
    ok, grad_norm, _ = state.optimizer.step()
    if ok:
        state.scheduler.step(increment=global_batch_size(run, dp))
    return float(_mean_loss(losses)), float(grad_norm or 0.0), ok


@torch.no_grad()
def evaluate(state: TrainState, run: RunConfig, data: TrainData) -> float:
    from megatron.core import parallel_state as ps

    for chunk in state.model:
        chunk.eval()
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    total = 0.0
    for i in range(run.eval_iters):  # always the same validation samples, so curves are comparable
        batches = list(microbatches(data.valid, i, run, dp_rank, dp))
        total += float(_mean_loss(_run_schedule(state, run, batches, forward_only=True)))
    for chunk in state.model:
        chunk.train()
    return total / max(run.eval_iters, 1)


# ---- the loop -----------------------------------------------------------------------------------------------------

def train(model_kwargs: dict[str, Any], run: RunConfig, sources: DataSources) -> dict[str, Any]:
    """Train (resuming from the latest checkpoint if there is one); returns the run's summary on rank 0."""
    from megatron.core import parallel_state as ps

    rank = torch.distributed.get_rank()
    dp = ps.get_data_parallel_world_size()
    data = build_train_data(run, sources, dp)
    vocab = padded_vocab_size(run, data.tokenizer)
    state = setup(model_kwargs, run, vocab)
    arch = ckpt.architecture(state.config, vocab)
    reporter = Reporter(run.train_iters, run.tensorboard_dir, run.progress_bar, active=rank == 0)

    load_root = ckpt.resume_root(run.save, run.load)
    resume_from = ckpt.latest_iteration(load_root)
    if resume_from is not None:
        common = ckpt.load_checkpoint(ckpt.iteration_dir(load_root, resume_from), state.inner, state.optimizer,
                                      state.scheduler, arch, run.use_distributed_optimizer)
        state.iteration, state.extra = common["iteration"], dict(common.get("extra") or {})
        reporter.history = state.extra.get("history", reporter.history)
        reporter.message(f"resumed from {load_root} at iteration {state.iteration}")

    n_params = sum(p.numel() for m in state.inner for p in m.parameters())
    reporter.message(
        f"xLSTM {state.config.xlstm_block} pattern={state.config.layer_pattern} params/rank={n_params:,} "
        f"TP={run.tensor_model_parallel_size} PP={run.pipeline_model_parallel_size} DP={dp} "
        f"microbatches={num_microbatches(run, dp)} vocab={vocab}"
    )
    gbs = global_batch_size(run, dp)
    tokens_per_iter = gbs * run.seq_length
    flops_per_token = train_flops_per_token(state.config, vocab, run.seq_length)
    peak = peak_tflops_per_device(run.bf16)
    if not sources.mock and run.eval_interval and parse_split(run.split)[1] == 0:
        raise ConfigError(f"split={run.split!r} has no validation share; give it one or set --eval-interval 0")
    last_val = None
    t_last, it_last = time.time(), state.iteration
    while state.iteration < run.train_iters:
        loss, grad_norm, ok = train_step(state, run, data)
        state.iteration += 1
        it = state.iteration
        show = it % run.log_interval == 0 or it == run.train_iters
        values: dict[str, Any] = {"lm loss": loss, "learning rate": state.scheduler.get_lr(
            state.optimizer.param_groups[0]), "grad norm": grad_norm, "global batch size": gbs}
        if show:
            elapsed = time.time() - t_last
            values["elapsed time per iteration (ms)"] = 1000 * elapsed / max(it - it_last, 1)
            values["tokens/s"] = tokens_per_iter * (it - it_last) / max(elapsed, 1e-9)
            tflops = flops_per_token * values["tokens/s"] / 1e12 / torch.distributed.get_world_size()
            values["TFLOP/s/device"] = tflops
            if peak:
                values["MFU"] = tflops / peak
            if torch.cuda.is_available():
                values["mem (GiB)"] = torch.cuda.max_memory_allocated() / 2**30
            t_last, it_last = time.time(), it
        if not ok:
            values["skipped"] = 1
        reporter.iteration(it, values, show)
        if run.eval_interval and (it % run.eval_interval == 0 or it == run.train_iters):
            last_val = evaluate(state, run, data)
            reporter.validation(it, last_val)
            t_last = time.time()  # keep evaluation out of the iteration timings
        stop_now = run.exit_interval is not None and it % run.exit_interval == 0
        if run.save and (it == run.train_iters or stop_now or (run.save_interval and it % run.save_interval == 0)):
            state.extra["history"] = reporter.history
            path = ckpt.save_checkpoint(run.save, it, state.inner, state.optimizer, state.scheduler, arch,
                                        state.extra, run.use_distributed_optimizer)
            reporter.message(f"saved checkpoint {path}")
        if stop_now and it < run.train_iters:
            reporter.message(f"exiting at iteration {it} (exit_interval={run.exit_interval})")
            break

    summary: dict[str, Any] = {"iteration": state.iteration, "history": reporter.history, "valid_loss": last_val}
    if run.sample_tokens and run.virtual_pipeline_model_parallel_size:
        reporter.message("text sample skipped: the interleaved schedule cannot run a single-microbatch forward")
    elif run.sample_tokens and data.tokenizer is not None and state.iteration >= run.train_iters:
        from xlstm_megatron.training.sampling import generate_text

        text = generate_text(state, run, data.tokenizer, run.sample_prompt or "", run.sample_tokens)
        summary["sample"] = text
        reporter.message(f"----- sample ({run.sample_tokens} tokens) -----\n{text}\n-----")
    if rank == 0 and (run.loss_curve or run.save) and reporter.history["train"]:
        png = run.loss_curve or str(Path(run.save) / "loss_curve.png")
        title = f"xLSTM {state.config.xlstm_block} {state.config.layer_pattern}"
        summary["loss_curve"] = str(plot_loss_curve(reporter.history, png, title))
        reporter.message(f"loss curve: {summary['loss_curve']}")
    if last_val is not None:
        summary["valid_ppl"] = math.exp(min(last_val, 50.0))
    if rank == 0 and not sources.mock and data.train is not None and data.valid is not None and last_val is not None:
        from xlstm_megatron.training.baseline import perplexity, unigram_baseline_loss

        base = unigram_baseline_loss(data.train, data.valid, run.train_iters * gbs, run.eval_iters * gbs, vocab)
        summary.update(unigram_valid_loss=base, unigram_valid_ppl=perplexity(base))
        reporter.message(f"validation PPL {summary['valid_ppl']:.1f} vs unigram baseline PPL {perplexity(base):.1f} "
                         f"(unigram fit on the {run.train_iters * gbs} training samples)")
    reporter.close()
    return summary

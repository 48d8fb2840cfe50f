"""Whole-model train step: tokens/s, TFLOP/s per device and MFU (model FLOPs from xlstm_megatron.models.flops).

A benchmark harness, not a training loop: the model is built from Megatron arguments through `xlstm_megatron.runs`
(the builder `pretrain()` uses), wrapped in Megatron's DDP, stepped by `get_megatron_optimizer`, and each step is
megatron.core's own `get_forward_backward_func()` schedule (1F1B / interleaved with PP) over random tokens, with
Megatron's gradient finalisation (DP all-reduce, embedding and sequence-parallel grads) and the optimizer step:

    python bench/train_step.py --config configs/tiny/large_cpu.yaml --steps 10         # here: CPU, --nproc ranks
    torchrun --nproc_per_node 8 bench/train_step.py --config configs/large/xlstm_7b.yaml --bf16 --steps 20

Any Megatron / xLSTM flag after the bench's own overrides the YAML (`--micro-batch-size 4 --sequence-parallel`).
YAML keys that are not Megatron arguments (data, sampling, launcher settings such as `nproc`) do not change the step
and are ignored, except `nproc`. Prints one line and writes JSON (run environment, arguments, per-step times) to
bench/results/.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_env import run_env, write_result  # noqa: E402

DEFAULT_VOCAB = 50304


def _model_chunks(args: Any) -> list:
    """This rank's model chunks (one per virtual stage) via runs.model, on the GPU when there is one."""
    import torch
    from megatron.core import parallel_state as ps

    from xlstm_megatron.runs.model import build_xlstm_model

    vpp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp in range(vpp or 1):
        stage = vp if vpp else None
        chunk = build_xlstm_model(
            args, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage), vp_stage=stage,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def _wrap(args: Any, chunks: list) -> tuple[list, Any]:
    """Megatron's DDP around each chunk (Float16Module first with bf16/fp16) and Megatron's optimizer, wired into the
    model config as `megatron.training.setup_model_and_optimizer` wires them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    if args.bf16 or args.fp16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32, overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=args.ddp_bucket_size,
    )
    model = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
             for i, chunk in enumerate(chunks)]
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr or 1e-4, weight_decay=args.weight_decay, bf16=args.bf16, fp16=args.fp16,
        params_dtype=args.params_dtype, clip_grad=args.clip_grad, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, use_distributed_optimizer=args.use_distributed_optimizer,
    ), model)
    for chunk in model:
        chunk.config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
    return model, optimizer


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    losses = model(tokens, None, None, labels=labels)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}

    return losses, loss_func


def _worker(args: Any, steps: int, warmup: int, out: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)  # before megatron.training's INFO-level set-up: keep the output short
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from xlstm_megatron.models.flops import peak_tflops_per_device, train_flops_per_token
    from xlstm_megatron.runs.launch import init_parallel, shutdown_parallel

    env = init_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        args.virtual_pipeline_model_parallel_size, seed=args.seed)
    dp = ps.get_data_parallel_world_size()
    mbs, seq = args.micro_batch_size, args.seq_length
    global_batch = args.global_batch_size or mbs * dp
    microbatches = global_batch // (mbs * dp)
    chunks = _model_chunks(args)
    config = chunks[0].config
    model, optimizer = _wrap(args, chunks)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(args.seed + ps.get_data_parallel_rank())
    tokens = torch.randint(0, args.padded_vocab_size, (mbs, seq + 1), generator=g).to(device)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    data = [itertools.repeat(batch) for _ in model] if len(model) > 1 else itertools.repeat(batch)
    schedule = get_forward_backward_func()
    times = []
    for step in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        schedule(forward_step_func=_forward_step, data_iterator=data, model=model, num_microbatches=microbatches,
                 seq_length=seq, micro_batch_size=mbs, forward_only=False)
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    tokens_per_step = global_batch * seq
    step_s = statistics.median(times)
    world = torch.distributed.get_world_size()
    tflops = train_flops_per_token(config, args.padded_vocab_size, seq) * tokens_per_step / step_s / 1e12 / world
    peak = peak_tflops_per_device(args.bf16)
    if env.rank == 0:
        arch = {k: getattr(args, k) for k in ("xlstm_block", "num_layers", "hidden_size", "num_attention_heads",
                                              "ffn_hidden_size", "padded_vocab_size")}
        result = {
            "env": run_env(), "model": {**arch, "pattern": config.layer_pattern}, "world_size": world,
            "tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size, "dp": dp,
            "vpp": args.virtual_pipeline_model_parallel_size, "sequence_parallel": args.sequence_parallel,
            "global_batch": global_batch, "micro_batch": mbs, "seq_length": seq, "bf16": args.bf16,
            "distributed_optimizer": args.use_distributed_optimizer, "step_seconds": times, "median_step_s": step_s,
            "tokens_per_s": tokens_per_step / step_s, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None,
        }
        print(f"{args.xlstm_block} {config.layer_pattern[:24]} world={world} tokens/s={tokens_per_step / step_s:,.0f} "
              f"TFLOP/s/device={tflops:.4g} MFU={result['mfu']}")
        write_result(Path(out), result)
    shutdown_parallel()


def _megatron_argv(config: Path | None, flags: list[str]) -> tuple[list[str], int | None]:
    """Megatron argv of the YAML (its Megatron keys; `nproc` returned apart) followed by the command-line flags."""
    import yaml

    from xlstm_megatron.runs.args import megatron_parser, yaml_to_argv

    if config is None:
        return flags, None
    doc = yaml.safe_load(config.read_text()) or {}
    dests = {a.dest for a in megatron_parser()._actions} | {"slstm_at"}
    nproc = None
    kept: dict[str, Any] = {}
    for section in ("model", "train"):
        body = dict(doc.get(section) or {})
        nproc = body.pop("nproc", nproc)
        kept[section] = {k: v for k, v in body.items() if k in dests}
        ignored = sorted(set(body) - set(kept[section]))
        if ignored:
            print(f"bench: ignoring {section} keys that do not change the step: {', '.join(ignored)}", file=sys.stderr)
    return [*yaml_to_argv(kept, megatron_parser()), *flags], nproc


def _validated_args(argv: list[str], world_size: int) -> Any:
    """megatron_args with the vocabulary padded as Megatron's tokenizer set-up pads it."""
    import torch
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    from xlstm_megatron.runs.args import megatron_args

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron requires it with TP (as its launch examples)
    if torch.cuda.is_available():
        args = megatron_args(argv, world_size=world_size)
    else:  # validate_args asks the GPU's architecture for TP > 1; the pretrain shims answer for CPU
        from xlstm_megatron.compat import pretrain_context

        with pretrain_context():
            args = megatron_args(argv, world_size=world_size)
    if args.padded_vocab_size is None:
        args.padded_vocab_size = calculate_padded_vocab_size(
            args.vocab_size or DEFAULT_VOCAB, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    return args


def main() -> None:
    from xlstm_megatron.runs.args import megatron_parser
    from xlstm_megatron.runs.launch import launch_env, run_processes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML run config (model: / train: sections)")
    parser.add_argument("--nproc", type=int, help="local processes to start (default: the config's, else TP x PP)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    bench, flags = parser.parse_known_args()
    argv, yaml_nproc = _megatron_argv(bench.config, flags)
    if "--seq-length" in argv and "--max-position-embeddings" not in argv:
        argv += ["--max-position-embeddings", argv[argv.index("--seq-length") + 1]]
    env = launch_env()
    layout, _ = megatron_parser().parse_known_args(argv)
    nproc = env.world_size if env.launched else bench.nproc or yaml_nproc or (
        layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size)
    args = _validated_args(argv, nproc)
    if env.launched:
        _worker(args, bench.steps, bench.warmup, bench.out)
    else:
        run_processes(_worker, nproc, args=(args, bench.steps, bench.warmup, bench.out))


if __name__ == "__main__":
    main()

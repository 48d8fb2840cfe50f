"""Whole-model train step: tokens/s, TFLOP/s per device and MFU (model FLOPs from xlstm_megatron.models.flops).

Runs the real training step (Megatron DDP, optimizer, pipeline schedule) on Megatron's mock data, for any YAML config:

    python bench/train_step.py --config configs/demo/shakespeare_v1_tp2_cpu.yaml --steps 10   # here: CPU, --nproc ranks
    torchrun --nproc_per_node 8 bench/train_step.py --config configs/large/xlstm_7b.yaml --bf16 --steps 20

Prints one line per config and writes JSON (run environment, config, per-step times) to bench/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_env import run_env, write_result  # noqa: E402


def _worker(model_kwargs: dict, run, steps: int, warmup: int, out: str) -> None:
    import torch

    from xlstm_megatron.training.batches import DataSources, build_train_data, global_batch_size, padded_vocab_size
    from xlstm_megatron.training.distributed import init_worker, shutdown_worker
    from xlstm_megatron.training.reporting import peak_tflops_per_device
    from xlstm_megatron.training.trainer import setup, train_step

    env = init_worker(run)
    from megatron.core import parallel_state as ps

    from xlstm_megatron.models.flops import train_flops_per_token

    dp = ps.get_data_parallel_world_size()
    data = build_train_data(run, DataSources(None, None, True), dp)
    vocab = padded_vocab_size(run, None)
    state = setup(model_kwargs, run, vocab)
    times = []
    for step in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(state, run, data)
        state.iteration += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    tokens = global_batch_size(run, dp) * run.seq_length
    step_s = statistics.median(times)
    world = torch.distributed.get_world_size()
    tflops = train_flops_per_token(state.config, vocab, run.seq_length) * tokens / step_s / 1e12 / world
    peak = peak_tflops_per_device(run.bf16)
    if env.rank == 0:
        result = {
            "env": run_env(), "model": model_kwargs, "world_size": world, "tp": run.tensor_model_parallel_size,
            "pp": run.pipeline_model_parallel_size, "dp": dp, "global_batch": global_batch_size(run, dp),
            "seq_length": run.seq_length, "bf16": run.bf16, "step_seconds": times, "median_step_s": step_s,
            "tokens_per_s": tokens / step_s, "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
        }
        print(f"{model_kwargs.get('xlstm_block')} {state.config.layer_pattern[:24]} world={world} "
              f"tokens/s={tokens / step_s:,.0f} TFLOP/s/device={tflops:.4g} MFU={result['mfu']}")
        write_result(Path(out), result)
    shutdown_worker()


def main() -> None:
    from xlstm_megatron.training.distributed import launch_env, run_processes
    from xlstm_megatron.training.run_config import add_run_args, load_run_config

    parser = add_run_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    args = parser.parse_args()
    model_kwargs, run = load_run_config(args)
    # Mock data and no evaluation, checkpoints or logging: only the step is timed.
    run.mock_data, run.demo_data, run.data_path = True, False, None
    run.vocab_size = run.vocab_size or 50304
    run.eval_interval, run.save, run.load, run.train_iters = 0, None, None, args.warmup + args.steps + 1
    run.lr_warmup_iters, run.lr_decay_iters = 0, None
    if launch_env().launched:
        _worker(model_kwargs, run, args.steps, args.warmup, args.out)
    else:
        run_processes(_worker, run.nproc, args=(model_kwargs, run, args.steps, args.warmup, args.out))


if __name__ == "__main__":
    main()

"""DeepSpeed as the second training engine (`xlstm-megatron train --deepspeed`): ZeRO 1/2/3 train the xLSTM model
exactly as Megatron does, with Megatron's tensor (and sequence) parallelism inside the layers.

Model level (real gloo ranks, the engine's building blocks): ZeRO-1/2/3 at DP=2 equal a one-process Megatron run;
at TP=2 x DP=2, ZeRO-2 and ZeRO-3 equal Megatron's DDP on the same layout with and without sequence parallelism; the
`deepspeed.zero.Init` build equals the normal build. End to end (the command as a user starts it, TP=2 + SP x DP=2,
ZeRO-3): it trains and resumes bitwise from DeepSpeed's checkpoint; `convert deepspeed-to-megatron` gives the trained
weights, whose Hugging Face export has our logits; contradictions are refused before any process starts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.megatron.dist import run_distributed  # noqa: E402
from tests.training.engine_runs import BASE, model_tensors  # noqa: E402

STEPS = 3
# Clipping at 0.5 is active on these steps (it tests DeepSpeed's TP-aware gradient norm); constant LR/WD schedule.
FLAGS = ["--clip-grad", "0.5", "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--weight-decay", "0.1"]


def _args(tp: int, sp: bool):
    from megatron.core import parallel_state as ps

    from xlstm_megatron.training.command import parse_run_args

    flags = [*BASE, *FLAGS, "--tensor-model-parallel-size", str(tp), *(["--sequence-parallel"] if sp else [])]
    world = torch.distributed.get_world_size()
    args, _ = parse_run_args(flags, world_size=world, rank=torch.distributed.get_rank())
    args.padded_vocab_size = 256
    assert ps.get_tensor_model_parallel_world_size() == tp
    return args


def _batches(args) -> list[list[dict[str, torch.Tensor]]]:
    """This DP rank's microbatches of every step (microbatch j of a step goes to DP rank j % DP: the global batch is
    the same set of microbatches at any DP size)."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(0)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    steps = []
    for _ in range(STEPS):
        micro = []
        for j in range(args.global_batch_size // args.micro_batch_size):
            shape = (args.micro_batch_size, args.seq_length)
            mb = {"tokens": torch.randint(0, 256, shape, generator=g),
                  "labels": torch.randint(0, 256, shape, generator=g), "loss_mask": torch.ones(shape)}
            if j % dp == rank:
                micro.append(mb)
        steps.append(micro)
    return steps


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from xlstm_megatron.training.deepspeed_engine import gathered_params

    with gathered_params(model):
        return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def _megatron_run(args) -> dict:
    """Megatron's own DDP + optimizer + schedule on the same batches: the reference."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from xlstm_megatron.runs.model import build_xlstm_model
    from xlstm_megatron.training.deepspeed_engine import build_scheduler

    inner = build_xlstm_model(args)
    init = _params(inner)
    cfg = inner.config
    model = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), inner)
    cfg.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad), [model])
    scheduler = build_scheduler(optimizer, args)

    def forward_step(it, m):
        mb = next(it)
        out = m(mb["tokens"], None, None, labels=mb["labels"])
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach().clone()})

    losses = []
    for micro in _batches(args):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reported = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model], num_microbatches=len(micro),
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size)
        ok, _, _ = optimizer.step()
        assert ok
        scheduler.step(increment=args.global_batch_size)
        losses.append(_dp_mean(torch.stack([r["loss"] for r in reported]).mean()))
    return {"init": init, "losses": losses, "params": _params(inner)}


def _dp_mean(x: torch.Tensor) -> float:
    from megatron.core import parallel_state as ps

    x = x.clone()
    torch.distributed.all_reduce(x, group=ps.get_data_parallel_group())
    return float(x / ps.get_data_parallel_world_size())


def _deepspeed_run(args, stage: int) -> dict:
    from xlstm_megatron.training.deepspeed_engine import (
        build_model,
        ds_config_from_args,
        initialize_engine,
        train_step,
    )

    ds_config = ds_config_from_args(args, {"zero_optimization": {"stage": stage}})
    model = build_model(args, ds_config)  # under deepspeed.zero.Init for stage 3
    init = _params(model)
    engine, _, scheduler = initialize_engine(args, ds_config, model)
    losses = [train_step(engine, scheduler, iter(micro), len(micro), args.global_batch_size)
              for micro in _batches(args)]
    return {"init": init, "losses": losses, "params": _params(engine.module),
            "zero3": hasattr(next(engine.module.parameters()), "ds_id"),
            "replicated_over_tp": sorted(n for n, p in engine.module.named_parameters()
                                         if getattr(p, "sequence_parallel", False))}


def _runs(tp: int, plan: list[tuple[str | int, bool]]) -> list[dict]:
    from xlstm_megatron.compat import model_parallel_manual_seed

    out = []
    for what, sp in plan:
        args = _args(tp, sp)
        model_parallel_manual_seed(args.seed)  # every build starts from the same generator state
        out.append(_megatron_run(args) if what == "megatron" else _deepspeed_run(args, int(what)))
    return out


def _assert_same(run: dict, ref: dict, params: bool = True) -> None:
    torch.testing.assert_close(run["losses"], ref["losses"], atol=1e-6, rtol=1e-6)
    if params:
        assert run["params"].keys() == ref["params"].keys()
        for name, p in ref["params"].items():
            torch.testing.assert_close(run["params"][name], p, atol=1e-6, rtol=1e-5, msg=name)


def test_zero_1_2_3_at_dp2_equal_one_process():
    ref = run_distributed(_runs, world_size=1, args=(1, [("megatron", False)]), timeout=300)[0][0]
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
    ranks = run_distributed(_runs, world_size=2, args=(1, [(1, False), (2, False), (3, False)]), timeout=300)
    for rank in ranks:
        for run in rank:
            _assert_same(run, ref)
        assert rank[2]["zero3"]  # stage 3 really partitioned the parameters


def test_tp2_dp2_zero2_zero3_equal_megatron_ddp_with_and_without_sp():
    plan = [("megatron", False), (2, False), (3, False), ("megatron", True), (2, True), (3, True)]
    ranks = run_distributed(_runs, world_size=4, tp=2, args=(2, plan), timeout=420)
    for rank in ranks:
        for ref, runs in ((rank[0], rank[1:3]), (rank[3], rank[4:6])):
            for run in runs:
                _assert_same(run, ref)
        # the zero.Init build (ZeRO-3, gathered) equals the normal build, weight for weight
        for ref, zero3 in ((rank[0], rank[2]), (rank[3], rank[5])):
            assert zero3["zero3"]
            assert all(zero3["init"][n].equal(p) for n, p in ref["init"].items())
    # sequence parallel: the norm weights stay identical on both TP ranks (they drift without the TP reduction)
    for dp_pair in ((0, 1), (2, 3)):
        a, b = (ranks[r][5]["params"] for r in dp_pair)
        norms = ranks[0][5]["replicated_over_tp"]
        assert len(norms) >= 5 and all(a[n].equal(b[n]) for n in norms), norms


# ---- end to end: the command ---------------------------------------------------------------------------------------
# The Large block (it exports to Hugging Face), TP=2 with sequence parallelism x DP=2, ZeRO-3 (built under zero.Init).
E2E = [*BASE, "--xlstm-block", "large", "--xlstm-pattern", "mm", "--num-layers", "2", "--hidden-size", "64",
       "--num-attention-heads", "2", "--train-iters", "4", "--eval-interval", "2", "--save-interval", "2",
       "--tensor-model-parallel-size", "2", "--sequence-parallel"]


def _train(save: Path, ds_config: Path, nproc: int = 4) -> None:
    cmd = [sys.executable, "-m", "xlstm_megatron.cli", "train", *E2E, "--save", str(save), "--nproc", str(nproc),
           "--deepspeed", str(ds_config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-4000:])


def _history(save: Path) -> dict[str, dict[int, float]]:
    summary = json.loads((save / "summary.json").read_text())
    return {name: {int(it): loss for it, loss in points} for name, points in summary["history"].items()}


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero3")
    config = root / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    _train(root / "run", config)
    return root / "run"


def test_zero3_tp2_sp_run_trains_and_resumes_bitwise(zero3_run, tmp_path):
    full = _history(zero3_run)
    assert sorted(full["train"]) == [1, 2, 3, 4] and sorted(full["valid"]) == [2, 4]
    assert full["train"][4] < full["train"][1]
    # Resume from the DeepSpeed checkpoint of iteration 2 (what a run stopped there leaves) with fresh logs.
    resumed = tmp_path / "run"
    shutil.copytree(zero3_run, resumed, ignore=shutil.ignore_patterns("tensorboard", "iter_*", "global_step4",
                                                                      "latest_checkpointed_iteration.txt"))
    (resumed / "latest").write_text("global_step2")
    _train(resumed, zero3_run.parent / "zero3.json")
    again = _history(resumed)
    assert again["train"] == {k: v for k, v in full["train"].items() if k > 2}  # exact floats
    assert again["valid"] == {4: full["valid"][4]}
    a, b = (model_tensors(run / "iter_0000004") for run in (zero3_run, resumed))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _hf_and_our_logits(hf_dir: str, ckpt: str) -> tuple[torch.Tensor, torch.Tensor]:
    from tests.convert.hf_models import checkpoint_model, full_logits, hf_logits, load_hf

    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    model, _ = checkpoint_model(Path(ckpt))
    return hf_logits(load_hf(Path(hf_dir)), tokens), full_logits(model, tokens)


def test_zero3_checkpoint_exports_to_megatron_and_hf(zero3_run, tmp_path):
    pytest.importorskip("transformers")
    from tests.convert.hf_models import convert

    out = tmp_path / "megatron"
    proc = subprocess.run([sys.executable, "-m", "xlstm_megatron.cli", "convert", "deepspeed-to-megatron", "--ckpt",
                           str(zero3_run), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the gathered fp32 weights of DeepSpeed's files are the trained model the engine itself wrote, bitwise
    a, b = model_tensors(out / "iter_0000004"), model_tensors(zero3_run / "iter_0000004")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    [(rc, err)] = convert(["megatron-to-hf", "--ckpt", out, "--out", tmp_path / "hf"])
    assert rc == 0, err
    ((hf, ours),) = run_distributed(_hf_and_our_logits, world_size=1, args=(str(tmp_path / "hf"), str(out)))
    torch.testing.assert_close(hf, ours, atol=1e-4, rtol=1e-4)


# ---- refusals before any process starts (in this process, as tests/training/test_bad_input.py) ------------------
@pytest.mark.parametrize(("flags", "ds", "message"), [
    (["--pipeline-model-parallel-size", "2"], {}, "pipeline"),
    (["--use-distributed-optimizer"], {}, "--use-distributed-optimizer"),
    (["--reset-attention-mask"], {}, "--reset-attention-mask"),
    ([], {"gradient_clipping": 0.3}, "gradient_clipping"),
    ([], {"train_micro_batch_size_per_gpu": 4}, "--micro-batch-size"),
    ([], {"bf16": {"enabled": True}}, "--bf16"),
    ([], {"optimizer": {"type": "Adam"}}, "optimizer"),
])
def test_contradictions_are_refused_before_start(capfd, tmp_path, flags, ds, message):
    from xlstm_megatron.cli import main

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **ds}))
    rc = main(["train", *BASE, "--save", str(tmp_path / "run"), "--nproc", "2", "--deepspeed", str(path), *flags])
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err[-2000:]
    assert not (tmp_path / "run").exists()  # nothing written

"""`xlstm-megatron train --deepspeed DS_CONFIG_JSON`: DeepSpeed (ZeRO 1-3, CPU/NVMe offload) as a second training
engine for the same model, data, logging and report as Megatron's loop.

DeepSpeed *is* the loop here: a plain loop around `deepspeed.initialize`. What stays Megatron's: the model
(`runs.model.build_xlstm_model`, with Megatron's tensor and sequence parallelism inside the layers), the data
(Megatron's GPT datasets and samplers through `build_train_valid_test_data_iterators`), the LR / weight-decay schedule
(Megatron's `OptimizerParamScheduler` from the same flags) and the TensorBoard tags (`lm loss`, `lm loss validation`),
so `training.report` draws the loss curve and writes `summary.json` unchanged. DeepSpeed does data parallelism, ZeRO
partitioning, offload, gradient clipping and its own checkpoints. The optimizer is plain `torch.optim.AdamW` with
Megatron's arguments and weight-decay groups (DeepSpeed's CPU Adam would compile an extension on first use).

Traps handled (measured with deepspeed 0.19.8; docs/deepspeed.md):
- DeepSpeed's `mpu` must answer `get_model_parallel_*`: `MegatronMPU` maps them to Megatron's tensor-parallel group.
- Nothing in DeepSpeed all-reduces the gradients of sequence-parallel parameters (norms) over the TP group: a tensor
  hook per such parameter does, as Megatron's `finalize_model_grads` would.
- Under `deepspeed.zero.Init` (ZeRO-3) a module's weight is already partitioned when its parent initialises it: the
  fused-row init writes under a gathered view (`ops.init.gathered_for_write`).
- DeepSpeed clips at 1.0 when `gradient_clipping` is unset: it is always written from `--clip-grad`.

Whatever DeepSpeed cannot do with Megatron's machinery (pipeline parallelism through Megatron's schedules, Megatron's
distributed optimizer, Megatron/torch FSDP, context parallelism) is refused before any process starts
(`check_deepspeed_args`, called by the command's pre-start checks).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import time
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from xlstm_megatron.runs.errors import ConfigError

INSTALL_HINT = 'pip install --no-build-isolation "xlstm-megatron[deepspeed]"'
CLIENT_STATE_KEY = "xlstm_megatron"
"""Key of our training state (iteration, consumed samples, LR schedule, the run's Megatron args) inside DeepSpeed's
client state."""


# ---- DeepSpeed's view of Megatron's parallel state -------------------------------------------------------------------
class MegatronMPU:
    """DeepSpeed's `mpu` protocol answered from `megatron.core.parallel_state`. DeepSpeed asks for the "model parallel"
    group (gradient-norm reduction, checkpoint file names `mp_rank_XX`); with pipeline parallelism refused that is
    Megatron's tensor-parallel group. Passing `parallel_state` itself fails: it lacks `get_model_parallel_world_size`.
    """

    @staticmethod
    def _ps() -> Any:
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> Any:
        return self._ps().get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group(self) -> Any:
        return self._ps().get_data_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


# ---- the DeepSpeed config: the user's file plus what Megatron's arguments decide -------------------------------------
def read_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed {path}: no such file; pass a DeepSpeed JSON config")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--deepspeed {path} must be a JSON object")
    return doc


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def ds_config_from_args(args: Namespace, user: dict[str, Any], where: str = "the DeepSpeed config") -> dict[str, Any]:
    """The DeepSpeed config of a run: the user's, with batch sizes, gradient clipping and precision written from
    Megatron's arguments (one source of truth). A value the user's config states that contradicts them is a one-line
    ConfigError (not silently overridden: the user meant something else)."""
    cfg = copy.deepcopy(user)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ConfigError(f"{where} has an `{section}` section; the optimizer is torch AdamW and the schedule "
                              "Megatron's, from --lr, --min-lr, --adam-*, --weight-decay, --lr-*: drop it")
    dp = int(args.data_parallel_size)
    gas, rest = divmod(int(args.global_batch_size), int(args.micro_batch_size) * dp)
    if rest or gas < 1:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                          f"{args.micro_batch_size} x data-parallel size {dp}")
    clip = float(args.clip_grad or 0.0)
    wanted: list[tuple[str, Any, str]] = [
        ("train_micro_batch_size_per_gpu", int(args.micro_batch_size), "--micro-batch-size"),
        ("gradient_accumulation_steps", gas, "--global-batch-size / (--micro-batch-size x data parallel)"),
        ("train_batch_size", int(args.global_batch_size), "--global-batch-size"),
        # DeepSpeed's default is 1.0 whatever Megatron says: always explicit, 0 = no clipping in both
        ("gradient_clipping", clip, "--clip-grad"),
    ]
    for key, value, flag in wanted:
        given = cfg.get(key, "auto")
        if given != "auto" and not _same(given, value):
            raise ConfigError(f"{where} sets {key}={given!r} but {flag} gives {value!r}; drop {key} from it "
                              f"(it is written from {flag}) or change {flag}")
        cfg[key] = value
    for section, on, flag in (("bf16", bool(args.bf16), "--bf16"), ("fp16", bool(args.fp16), "--fp16")):
        given = cfg.get(section, {}).get("enabled", "auto")
        if given != "auto" and bool(given) != on:
            raise ConfigError(f"{where} has {section}.enabled={given} but this run {'has' if on else 'lacks'} {flag}; "
                              f"precision comes from the Megatron flags: {'drop' if on else 'add'} {flag} or fix it")
        cfg[section] = {**cfg.get(section, {}), "enabled": on}
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, not {zero.get('stage')!r}")
    if any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")):
        # Offload with a client optimizer is allowed, on request; ours is torch AdamW (see module doc).
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 2**31 - 1)  # our log line is the record; DeepSpeed's would duplicate it
    return cfg


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, float) or isinstance(a, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def check_deepspeed_args(args: Namespace) -> None:
    """Pre-start checks of a `--deepspeed` run (no-op without it): DeepSpeed installed, the config readable and
    consistent with the Megatron arguments, and no combination DeepSpeed cannot run with Megatron's machinery."""
    path = getattr(args, "deepspeed_config", None)
    if not path:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"--deepspeed needs DeepSpeed: {INSTALL_HINT}")
    refusals = [
        (args.pipeline_model_parallel_size > 1, "--pipeline-model-parallel-size > 1 (Megatron's pipeline schedules "
                                                 "are not DeepSpeed's; use TP and ZeRO, or Megatron's loop)"),
        (getattr(args, "virtual_pipeline_model_parallel_size", None) is not None, "virtual pipeline stages"),
        (getattr(args, "context_parallel_size", 1) > 1, "--context-parallel-size > 1"),
        (bool(getattr(args, "reset_attention_mask", False)), "--reset-attention-mask (its loop reads no document mask; "
                                                               "use Megatron's loop for packed documents)"),
        (bool(args.use_distributed_optimizer), "--use-distributed-optimizer (ZeRO partitions the optimizer state: "
                                               "use zero_optimization.stage 1-3 instead)"),
        (bool(getattr(args, "use_torch_fsdp2", False)), "--use-torch-fsdp2 (use ZeRO-3 instead)"),
        (bool(getattr(args, "use_megatron_fsdp", False)), "--use-megatron-fsdp (use ZeRO-3 instead)"),
        (getattr(args, "rampup_batch_size", None) is not None, "--rampup-batch-size"),
        (getattr(args, "decoupled_lr", None) is not None, "--decoupled-lr"),
        (args.train_iters is None, "--train-samples (give --train-iters)"),
    ]
    for bad, what in refusals:
        if bad:
            raise ConfigError(f"--deepspeed cannot run with {what}")
    ds_config_from_args(args, read_ds_config(path), where=f"--deepspeed {path}")


# ---- building blocks: model, optimizer, schedule, engine -------------------------------------------------------------
def build_model(args: Namespace, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The run's model (Megatron's builder); under ZeRO-3 built inside `deepspeed.zero.Init`, so each rank only ever
    holds its partition of every parameter after its module is constructed."""
    from megatron.core import parallel_state as ps

    from xlstm_megatron.runs.model import build_xlstm_model

    if zero_stage(ds_config) != 3:
        return build_xlstm_model(args)
    import deepspeed

    # zero.Init reads its config through deepspeed.comm; uninitialised, it silently assumes one data-parallel rank
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=MegatronMPU(),
                             data_parallel_group=ps.get_data_parallel_group()):
        return build_xlstm_model(args)


def _full_shape(p: torch.nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # a ZeRO-3 parameter's own shape is its (empty) partition's


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Megatron's weight-decay groups: no decay on biases and 1-D parameters (norm weights, gate biases), `wd_mult`
    as Megatron's scheduler applies it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or len(_full_shape(p)) == 1 else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, args: Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_eps, weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, args: Namespace) -> Any:
    """Megatron's `OptimizerParamScheduler` with the arguments `megatron.training` gives it for an iteration-based
    run (steps counted in samples; stepped by the global batch after every optimizer step)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    decay = (args.lr_decay_iters or args.train_iters) * gbs
    warmup = args.lr_warmup_fraction * decay if args.lr_warmup_fraction is not None else args.lr_warmup_iters * gbs
    wsd = args.lr_wsd_decay_iters * gbs if getattr(args, "lr_wsd_decay_iters", None) is not None else None
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=args.lr_decay_style, start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay, wd_incr_steps=args.train_iters * gbs, wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler, wsd_decay_steps=wsd,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def reduce_sequence_parallel_grads(model: torch.nn.Module, sequence_parallel: bool) -> int:
    """Make every rank's gradient of a parameter replicated over the TP group the TP-group total, as Megatron's
    `finalize_model_grads` does for sequence-parallel (norm) weights; DeepSpeed only reduces over data parallel, so
    without this the TP ranks' copies drift apart. Tensor hooks run before the gradient is accumulated, i.e. before
    any ZeRO reduction hook sees it. Returns the number of hooked parameters."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0

    def hook(op: Any) -> Any:
        def reduce(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            torch.distributed.all_reduce(grad, op=op, group=group)
            return grad

        return reduce

    hooked = 0
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "average_gradients_across_tp_domain", False):
            p.register_hook(hook(torch.distributed.ReduceOp.AVG))
        elif sequence_parallel and getattr(p, "sequence_parallel", False):
            p.register_hook(hook(torch.distributed.ReduceOp.SUM))
        else:
            continue
        hooked += 1
    return hooked


def initialize_engine(args: Namespace, ds_config: dict[str, Any], model: torch.nn.Module | None = None
                      ) -> tuple[Any, torch.optim.Optimizer, Any]:
    """(DeepSpeed engine, the client AdamW whose param groups the schedule drives, Megatron's LR scheduler).
    Needs Megatron's parallel state (TP) and the process group."""
    import deepspeed

    model = model if model is not None else build_model(args, ds_config)
    reduce_sequence_parallel_grads(model, bool(args.sequence_parallel))
    optimizer = build_optimizer(model, args)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=MegatronMPU(),
                                           dist_init_required=False)
    # ZeRO wraps the client optimizer and steps it with its own param_groups dicts: the schedule writes lr/wd there.
    return engine, optimizer, build_scheduler(optimizer, args)


@contextlib.contextmanager
def gathered_params(module: torch.nn.Module) -> Iterator[None]:
    """Full parameters on every rank for reading (ZeRO-3 partitions them; a no-op otherwise)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


# ---- one step, evaluation --------------------------------------------------------------------------------------------
def microbatch_loss(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss per token of the microbatch: what is back-propagated, as Megatron's schedule divides the summed loss
    by the tokens; summed loss; tokens)."""
    losses = engine(batch["tokens"], None, None, labels=batch["labels"])
    mask = batch["loss_mask"].view(-1).float()
    total = torch.sum(losses.view(-1).float() * mask)
    tokens = mask.sum()
    return total / tokens.clamp(min=1.0), total.detach(), tokens.detach()


def _dp_mean_loss(total: torch.Tensor, tokens: torch.Tensor) -> float:
    """Per-token loss over the global batch, as Megatron reports `lm loss`."""
    from megatron.core import parallel_state as ps

    both = torch.stack([total, tokens]).float()
    torch.distributed.all_reduce(both, group=ps.get_data_parallel_group())
    return float(both[0] / both[1].clamp(min=1.0))


def _next_batch(data_iterator: Any) -> dict[str, torch.Tensor]:
    from xlstm_megatron.training.engine import _get_batch

    return _get_batch(data_iterator, None)  # read on TP rank 0, broadcast over TP (Megatron's broadcast_data)


def train_step(engine: Any, scheduler: Any, data_iterator: Any, num_microbatches: int, global_batch: int) -> float:
    """One iteration: `num_microbatches` forward/backward passes (DeepSpeed scales by 1/GAS and reduces over DP at
    the boundary), one optimizer step, the schedule advanced by the global batch. Returns Megatron's `lm loss`."""
    total = torch.zeros(())
    tokens = torch.zeros(())
    for _ in range(num_microbatches):
        loss, t, n = microbatch_loss(engine, _next_batch(data_iterator))
        engine.backward(loss)
        engine.step()
        total, tokens = total + t, tokens + n
    scheduler.step(increment=global_batch)
    return _dp_mean_loss(total, tokens)


@torch.no_grad()
def evaluate(engine: Any, data_iterator: Any, eval_iters: int, num_microbatches: int) -> float:
    engine.eval()
    total = torch.zeros(())
    tokens = torch.zeros(())
    for _ in range(eval_iters * num_microbatches):
        _, t, n = microbatch_loss(engine, _next_batch(data_iterator))
        total, tokens = total + t, tokens + n
    engine.train()
    return _dp_mean_loss(total, tokens)


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def checkpoint_tag(iteration: int) -> str:
    return f"global_step{iteration}"


def save(engine: Any, scheduler: Any, args: Namespace, iteration: int, megatron_copy: bool) -> None:
    """DeepSpeed's checkpoint (module, ZeRO optimizer partitions, our state in its client state) under `args.save`,
    and with `megatron_copy` also a weights-only Megatron checkpoint of the gathered weights next to it (what
    `generate`, `convert megatron-to-hf`, the report's text sample and the command's architecture check read)."""
    from xlstm_megatron.runs.checkpoint import save_weights_checkpoint

    state = {"iteration": iteration, "consumed_train_samples": args.consumed_train_samples,
             "consumed_valid_samples": args.consumed_valid_samples, "scheduler": scheduler.state_dict(),
             "args": _saved_args(args), "zero_stage": int(engine.zero_optimization_stage())}
    engine.save_checkpoint(args.save, tag=checkpoint_tag(iteration), client_state={CLIENT_STATE_KEY: state})
    if megatron_copy:
        with gathered_params(engine.module):
            save_weights_checkpoint([engine.module], args.save, iteration, args)


def _saved_args(args: Namespace) -> Namespace:
    saved = copy.copy(args)
    for name in list(vars(saved)):
        if name.startswith("_"):
            delattr(saved, name)
    return saved


def load(engine: Any, scheduler: Any, args: Namespace) -> int:
    """Resume from DeepSpeed's latest checkpoint under `args.load` (bitwise: module, optimizer, schedule, data
    position); with --finetune the weights only. A Megatron checkpoint there without a DeepSpeed one (an imported
    model) gives the weights. Returns the iteration to continue after (0 for a fresh start)."""
    from xlstm_megatron.runs.checkpoint import latest_iteration, load_model_weights, resolve_checkpoint_dir

    if not args.load:
        return 0
    if (Path(args.load) / "latest").is_file():
        finetune = bool(args.finetune)
        path, client = engine.load_checkpoint(
            args.load, load_module_only=finetune, load_optimizer_states=not (finetune or args.no_load_optim),
            load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"DeepSpeed could not load the checkpoint in {args.load}")
        state = (client or {}).get(CLIENT_STATE_KEY)
        if finetune or state is None:
            return 0
        scheduler.load_state_dict(state["scheduler"])
        args.consumed_train_samples = state["consumed_train_samples"]
        args.consumed_valid_samples = state["consumed_valid_samples"]
        return int(state["iteration"])
    if latest_iteration(args.load) is not None:  # weights only: an imported or Megatron-trained model
        params = [p for p in engine.module.parameters() if hasattr(p, "ds_id")]
        if params:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                load_model_weights([engine.module], resolve_checkpoint_dir(args.load))
        else:
            load_model_weights([engine.module], resolve_checkpoint_dir(args.load))
        # ZeRO-1/2 keep fp32 master copies made at initialize: refresh them from the loaded weights.
        _refresh_master_weights(engine)
    return 0


def _refresh_master_weights(engine: Any) -> None:
    opt = engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()


# ---- the run ---------------------------------------------------------------------------------------------------------
def _log(rank0: bool, text: str) -> None:
    if rank0:
        print(text, flush=True)


def run_deepspeed(args: Namespace) -> None:
    """The DeepSpeed loop on Megatron's validated global args (tokenizer built, inside `compat.pretrain_context()`):
    join the process group, build, resume, train with evaluation and checkpoints, save at the end."""
    from megatron.core import parallel_state as ps
    from megatron.training.global_vars import get_tensorboard_writer
    from megatron.training.training import build_train_valid_test_data_iterators

    from xlstm_megatron.runs.launch import init_parallel
    from xlstm_megatron.training.engine import datasets_provider

    init_parallel(args.tensor_model_parallel_size, 1, seed=args.seed)
    rank0 = torch.distributed.get_rank() == 0
    ds_config = ds_config_from_args(args, read_ds_config(args.deepspeed_config))
    engine, optimizer, scheduler = initialize_engine(args, ds_config)
    _log(rank0, f"DeepSpeed ZeRO-{zero_stage(ds_config)}: TP={ps.get_tensor_model_parallel_world_size()} "
                f"DP={ps.get_data_parallel_world_size()}, micro batch {args.micro_batch_size} x "
                f"{ds_config['gradient_accumulation_steps']} accumulation, clip {ds_config['gradient_clipping']}")

    args.consumed_train_samples = args.consumed_valid_samples = args.skipped_train_samples = 0
    iteration = load(engine, scheduler, args)
    args.iteration = iteration
    train_it, valid_it, _ = build_train_valid_test_data_iterators(datasets_provider)
    if isinstance(valid_it, list):  # several validation sets: the first is the reported one
        valid_it = valid_it[0]
    writer = get_tensorboard_writer()
    gas, gbs = int(ds_config["gradient_accumulation_steps"]), int(args.global_batch_size)

    start = time.time()
    while iteration < args.train_iters:
        t0 = time.time()
        loss = train_step(engine, scheduler, train_it, gas, gbs)
        iteration += 1
        args.iteration = iteration
        args.consumed_train_samples += gbs
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = engine.get_global_grad_norm()
        if writer is not None and iteration % args.tensorboard_log_interval == 0:
            writer.add_scalar("lm loss", loss, iteration)
            writer.add_scalar("learning-rate", lr, iteration)
            if grad_norm is not None:
                writer.add_scalar("grad-norm", float(grad_norm), iteration)
        if iteration % args.log_interval == 0:
            _log(rank0, f" iteration {iteration:8d}/{args.train_iters:8d} | lm loss: {loss:.6E} | lr: {lr:.6E} | "
                        f"grad norm: {float(grad_norm or 0):.3f} | elapsed per iteration (ms): "
                        f"{(time.time() - t0) * 1000:.1f}")
        if args.eval_iters and args.eval_interval and iteration % args.eval_interval == 0:
            valid = evaluate(engine, valid_it, args.eval_iters, gas)
            args.consumed_valid_samples += args.eval_iters * gbs
            if writer is not None:
                writer.add_scalar("lm loss validation", valid, iteration)
                writer.add_scalar("lm loss validation ppl", math.exp(min(valid, 20.0)), iteration)
            _log(rank0, f" validation loss at iteration {iteration} | lm loss value: {valid:.6E} | "
                        f"lm loss PPL: {math.exp(min(valid, 20.0)):.6E}")
        stop = bool(args.exit_interval) and iteration % args.exit_interval == 0
        last = iteration == args.train_iters
        if args.save and ((args.save_interval and iteration % args.save_interval == 0) or stop or last):
            save(engine, scheduler, args, iteration, megatron_copy=stop or last)
        if stop:
            break
    if writer is not None:
        writer.flush()
    _log(rank0, f"DeepSpeed training done at iteration {iteration} ({time.time() - start:.1f} s)")

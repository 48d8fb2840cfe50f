"""Megatron-Core on CPU/gloo with the compat shims: Megatron's own GPTModel (local spec) under TP, PP, DP + distributed
optimizer and dist-checkpoint resharding gives the same numbers as a single rank. Real gloo processes, no mocks."""

from __future__ import annotations

import re
import zlib
from typing import Any

import pytest
import torch

from tests.megatron.dist import RankFailedError, reinit_model_parallel, run_distributed

# The tests check the CPU shims: with CUDA they are inactive and Megatron would allocate on the GPU.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU/gloo compat layer")

VOCAB, SEQ, HIDDEN, HEADS, LAYERS = 128, 16, 32, 4, 4
ALL_CLOSE = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# helpers that run inside the ranks


def _gpt(vp_stage: int | None = None, **config_overrides: Any) -> torch.nn.Module:
    """A tiny GPTModel for this rank's TP/PP position (weights depend only on the RNG state, not on the layout)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from xlstm_megatron.compat import cpu_config_overrides

    kwargs = dict(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
    )
    config = TransformerConfig(**{**kwargs, **cpu_config_overrides(), **config_overrides})
    return GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        vp_stage=vp_stage,
    )


def _batches(n: int, micro_batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (micro_batch, SEQ), generator=g)
        out.append(
            dict(
                tokens=tokens,
                labels=torch.randint(0, VOCAB, (micro_batch, SEQ), generator=g),
                position_ids=torch.arange(SEQ).expand(micro_batch, SEQ),
            )
        )
    return out


def _forward_step(data_iterator, model):
    """Megatron schedule forward step: causal mask comes from the default (shimmed) mask of the local attention."""
    from functools import partial

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, torch.ones(batch["labels"].shape))


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss = (per_token_loss * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


def _global_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters keyed by layout-independent names: a pipeline stage's local layer index becomes the global one and
    the last stage's copy of the tied embedding is named like the embedding."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    offset = layers[0].layer_number - 1 if len(layers) else 0
    out = {}
    for name, p in model.named_parameters():
        name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
        out["embedding.word_embeddings.weight" if name == "output_layer.weight" else name] = p
    return out


def _init_by_name(model: torch.nn.Module) -> None:
    """Weights drawn from a generator seeded by the global name: equal for every pipeline layout."""
    with torch.no_grad():
        for name, p in _global_params(model).items():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))))


def _gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


# ---------------------------------------------------------------------------------------------------------------------
# TP


def _tp_forward(seed: int, **config_overrides: Any) -> dict[str, torch.Tensor]:
    """Full logits, per-token loss and the (vocab-gathered) tied-embedding grad of one forward/backward."""
    from megatron.core import tensor_parallel

    from xlstm_megatron.compat import model_parallel_manual_seed

    model_parallel_manual_seed(seed)  # resets the tracker's streams too (attention dropout draws from them)
    model = _gpt(**config_overrides)
    batch = _batches(1, 2)[0]
    logits = model(batch["tokens"], batch["position_ids"], None)
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    model_parallel_manual_seed(seed + 1)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss.mean().backward()
    emb_grad = _gather_tp(model.embedding.word_embeddings.weight.grad, dim=0)
    return dict(logits=logits.detach(), loss=loss.detach(), emb_grad=emb_grad)


def _tp_worker(seed: int) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    out = {"tp2": _tp_forward(seed), "tp_size": ps.get_tensor_model_parallel_world_size()}
    # Same dropout seed with and without full recompute: recompute must replay the RNG (CPU tracker + rng helpers).
    dropout = dict(hidden_dropout=0.2, attention_dropout=0.2)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    out["dropout"] = _tp_forward(seed, **dropout)
    out["dropout_recompute"] = _tp_forward(seed, **dropout, **recompute)
    reinit_model_parallel(tp=1, seed=seed)
    out["tp1"] = _tp_forward(seed)
    return out


def test_tensor_parallel_gpt_equals_single_rank():
    ranks = run_distributed(_tp_worker, world_size=2, tp=2, args=(7,), timeout=60)
    assert [r["tp_size"] for r in ranks] == [2, 2]
    for r in ranks:
        for key in ("logits", "loss", "emb_grad"):
            torch.testing.assert_close(r["tp2"][key], r["tp1"][key], **ALL_CLOSE)
            torch.testing.assert_close(r["dropout_recompute"][key], r["dropout"][key], **ALL_CLOSE)
        assert r["tp1"]["logits"].shape == (2, SEQ, VOCAB)
        assert not torch.allclose(r["dropout"]["loss"], r["tp1"]["loss"])  # dropout was active
    torch.testing.assert_close(ranks[0]["tp2"]["loss"], ranks[1]["tp2"]["loss"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# PP


def _pp_run(num_microbatches: int, micro_batch: int, vpp: int | None = None) -> dict[str, Any]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # cpu_config_overrides() turns batch_p2p_comm off: batched, interleaved PP=2 would swap activations and grads.
    chunks = [_gpt(vp_stage=i) for i in range(vpp)] if vpp else [_gpt()]
    for chunk in chunks:
        _init_by_name(chunk)
    batches = _batches(num_microbatches, micro_batch)
    iterators = [iter(batches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if vpp else iterators[0],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=micro_batch,
        forward_only=False,
    )
    grads = {k: p.grad.clone() for chunk in chunks for k, p in _global_params(chunk).items()}
    return dict(losses=[d["lm loss"] for d in losses], grads=grads)


def _pp_worker(num_microbatches: int, micro_batch: int) -> dict[str, Any]:
    out = {"pp2": _pp_run(num_microbatches, micro_batch)}
    reinit_model_parallel(pp=2, vpp=2)
    out["pp2_vpp2"] = _pp_run(num_microbatches, micro_batch, vpp=2)
    reinit_model_parallel(pp=1)
    out["pp1"] = _pp_run(num_microbatches, micro_batch)
    return out


def _merge_stages(stage_grads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Union of the stages' grads; the last stage's copy of the tied embedding adds to the first stage's grad."""
    merged: dict[str, torch.Tensor] = {}
    for grads in stage_grads:
        for name, g in grads.items():
            merged[name] = merged[name] + g if name in merged else g
    return merged


def test_pipeline_1f1b_gpt_equals_single_stage():
    ranks = run_distributed(_pp_worker, world_size=2, pp=2, args=(4, 2), timeout=60)
    reference = ranks[0]["pp1"]
    assert len(reference["losses"]) == 4
    for layout in ("pp2", "pp2_vpp2"):
        assert ranks[0][layout]["losses"] == []  # losses live on the last stage
        torch.testing.assert_close(ranks[1][layout]["losses"], reference["losses"], **ALL_CLOSE)
        grads = _merge_stages([r[layout]["grads"] for r in ranks])
        assert grads.keys() == reference["grads"].keys()
        for name, g in reference["grads"].items():
            torch.testing.assert_close(grads[name], g, **ALL_CLOSE, msg=f"{layout}: {name}")


# ---------------------------------------------------------------------------------------------------------------------
# DP + DDP + distributed optimizer (grad clipping active)


def _dp_train(
    global_batch: int, steps: int, distributed_optimizer: bool = True, bf16: bool = False, fp16: bool = False
) -> dict[str, Any]:
    """``steps`` Adam steps (clip_grad active) of DDP(GPT) on ``global_batch`` sequences split over the DP ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import check_param_hashes_across_dp_replicas

    from xlstm_megatron.compat import model_parallel_manual_seed

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    model_parallel_manual_seed(5)
    gpt = _gpt(bf16=bf16, fp16=fp16)
    inner = Float16Module(gpt.config, gpt) if bf16 or fp16 else gpt
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer, overlap_grad_reduce=False, grad_reduce_in_fp32=True
    )
    model = DistributedDataParallel(gpt.config, ddp_config, inner)
    gpt.config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=1e-2,
        clip_grad=0.05,
        use_distributed_optimizer=distributed_optimizer,
        bf16=bf16,
        fp16=fp16,
        initial_loss_scale=1024.0,  # dynamic loss scaling (fp16 only)
        log_num_zeros_in_grad=True,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    micro_batch = 2
    per_rank = global_batch // dp // micro_batch
    out: dict[str, Any] = {"losses": [], "grad_norms": [], "num_zeros": []}
    for step in range(steps):
        mine = _batches(global_batch // micro_batch, micro_batch, seed=100 + step)[dp_rank * per_rank :][:per_rank]
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(mine),
            model=[model],
            num_microbatches=len(mine),
            seq_length=SEQ,
            micro_batch_size=micro_batch,
        )
        ok, grad_norm, num_zeros = optimizer.step()
        assert ok
        loss = torch.stack([d["lm loss"] for d in losses]).float().mean()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        out["losses"].append(loss / dp)
        out["grad_norms"].append(grad_norm)
        out["num_zeros"].append(num_zeros)
    out["params"] = {n: p.detach().float().clone() for n, p in gpt.named_parameters()}
    out["replicas_match"] = check_param_hashes_across_dp_replicas([model], cross_check=True)
    return out


def _dp_worker(global_batch: int, steps: int) -> dict[str, Any]:
    return {
        "distopt": _dp_train(global_batch, steps),
        "plain_optimizer": _dp_train(global_batch, steps, distributed_optimizer=False),
        "distopt_bf16": _dp_train(global_batch, steps, bf16=True),
        "fp16_loss_scaling": _dp_train(global_batch, steps, distributed_optimizer=False, fp16=True),
    }


def test_data_parallel_distributed_optimizer_equals_single_rank():
    steps = 3
    dp2 = run_distributed(_dp_worker, world_size=2, args=(4, steps), timeout=60)
    (dp1,) = run_distributed(_dp_train, world_size=1, args=(4, steps), timeout=60)
    assert min(dp1["grad_norms"]) > 0.05  # clip_grad=0.05 really clipped each step
    for r in dp2:
        assert all(r[run]["replicas_match"] for run in r)  # Megatron's own cross-replica hash check
        for run in ("distopt", "plain_optimizer"):
            torch.testing.assert_close(r[run]["grad_norms"], dp1["grad_norms"], **ALL_CLOSE)
            assert r[run]["num_zeros"] == dp1["num_zeros"]
            torch.testing.assert_close(r[run]["losses"], dp1["losses"], **ALL_CLOSE)
            for name, p in dp1["params"].items():
                torch.testing.assert_close(r[run]["params"][name], p, **ALL_CLOSE, msg=f"{run}: {name}")
        # half-precision models + fp32 main params (MixedPrecisionOptimizer): only rounding away from the fp32 run
        for run in ("distopt_bf16", "fp16_loss_scaling"):
            torch.testing.assert_close(r[run]["losses"], dp1["losses"], rtol=2e-2, atol=0, msg=run)
            assert all(torch.isfinite(p).all() for p in r[run]["params"].values())


# ---------------------------------------------------------------------------------------------------------------------
# dist_checkpointing: save at TP=2, load at TP=1


def _eval_loss(model: torch.nn.Module) -> torch.Tensor:
    batch = _batches(1, 2, seed=3)[0]
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()


def _checkpoint_worker(ckpt_dir: str) -> dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    torch.manual_seed(21)
    model = _gpt()
    saved_loss = _eval_loss(model)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)

    reinit_model_parallel(tp=1)
    torch.manual_seed(22)
    fresh = _gpt()
    fresh_loss = _eval_loss(fresh)
    # Fully parallel load: the two DP ranks each read half and exchange the rest (exchange_utils' .cuda() paths).
    strategy = FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(ckpt_dir), ps.get_data_parallel_group(with_context_parallel=True)
    )
    state = dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir, sharded_strategy=strategy)
    fresh.load_state_dict(state)
    return dict(saved=saved_loss, fresh=fresh_loss, loaded=_eval_loss(fresh))


def test_dist_checkpoint_tp2_save_tp1_load(tmp_path):
    ranks = run_distributed(_checkpoint_worker, world_size=2, tp=2, args=(str(tmp_path),), timeout=60)
    for r in ranks:
        assert not torch.allclose(r["fresh"], r["saved"])  # the loaded model started from other weights
        torch.testing.assert_close(r["loaded"], r["saved"], **ALL_CLOSE)


# ---------------------------------------------------------------------------------------------------------------------
# harness and shim properties


def _raise_on_rank1() -> None:
    if torch.distributed.get_rank() == 1:
        raise ValueError("rank one fails")
    torch.distributed.barrier()  # rank 0 would wait forever without the harness killing it


def _die_on_rank1() -> None:
    import os

    if torch.distributed.get_rank() == 1:
        os._exit(3)  # no traceback, no result: like a segfault or the OOM killer
    torch.distributed.barrier()


def _sleep_forever() -> None:
    import time

    time.sleep(3600)


def _shim_facts() -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from xlstm_megatron.compat import enable_megatron_cpu_compat, is_cpu_compat_active
    from xlstm_megatron.compat.megatron_cpu import missing_shim_targets

    enable_megatron_cpu_compat()  # idempotent
    tracker = tensor_parallel.get_cuda_rng_tracker()
    default_before = torch.get_rng_state()
    with tracker.fork():
        tp_draw = torch.rand(4)
    # training-loop batch broadcast from TP rank 0 (`.cuda()` and device="cuda" inside)
    sent = {"tokens": torch.arange(6).view(2, 3)}
    received = tensor_parallel.broadcast_data(
        ["tokens"], sent if ps.get_tensor_model_parallel_rank() == 0 else None, torch.int64
    )
    return dict(
        broadcast=received["tokens"],
        active=is_cpu_compat_active(),
        missing=missing_shim_targets(),
        device=torch.cuda.current_device(),
        tp_draw=tp_draw,
        default_untouched=torch.equal(default_before, torch.get_rng_state()),
        default_draw=torch.rand(4),
    )


def test_shims_rng_streams_and_harness_errors():
    ranks = run_distributed(_shim_facts, world_size=2, tp=2)
    for r in ranks:
        assert r["active"] and r["missing"] == [] and r["device"] == torch.device("cpu") and r["default_untouched"]
        torch.testing.assert_close(r["broadcast"], torch.arange(6).view(2, 3), rtol=0, atol=0)
    # the model-parallel stream differs across TP ranks, the default stream does not
    assert not torch.equal(ranks[0]["tp_draw"], ranks[1]["tp_draw"])
    torch.testing.assert_close(ranks[0]["default_draw"], ranks[1]["default_draw"], rtol=0, atol=0)

    with pytest.raises(RankFailedError, match="rank one fails") as info:
        run_distributed(_raise_on_rank1, world_size=2, timeout=30)
    assert info.value.rank == 1
    with pytest.raises(RankFailedError, match="exit code 3") as info:
        run_distributed(_die_on_rank1, world_size=2, init_model_parallel=False, timeout=30)
    assert info.value.rank == 1
    with pytest.raises(TimeoutError, match="_sleep_forever"):  # the stack dump names the stuck function
        run_distributed(_sleep_forever, world_size=2, init_model_parallel=False, timeout=5)

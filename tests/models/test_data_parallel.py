"""DP=2 with Megatron's DDP and distributed optimizer trains an xLSTM stack exactly like DP=1 on the same batch."""

from __future__ import annotations

import torch

from tests.megatron.dist import run_distributed
from tests.models.helpers import build_model, randomize_tp_invariant, tiny_config

SEQ, VOCAB, MBS, GLOBAL_BATCH, STEPS = 10, 48, 2, 4, 3
CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=2, slstm_num_heads=2, xlstm_pattern="ms",
           mlstm_chunk_size=4)


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    output = model(tokens, None, None, labels=labels)
    # The schedule divides the returned loss in place; report a separate tensor.
    return output, lambda out: (out.float().mean(), {"loss": out.float().mean().detach().clone()})


def _train() -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cfg = tiny_config("v1", **CFG)
    inner = build_model(cfg, VOCAB, SEQ)
    randomize_tp_invariant(inner, seed=4, std=0.1)
    model = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True), inner
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    # The paper's AdamW settings. (With eps=1e-8, Adam turns fp32 reduction-order noise in gradients that are zero in
    # exact arithmetic, e.g. an sLSTM gate clamped at 1, into lr-sized steps, and no two reduction orders agree.)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=3e-3, adam_beta2=0.95, adam_eps=1e-5, weight_decay=0.1, clip_grad=0.5,
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    g = torch.Generator().manual_seed(0)
    out = {"losses": [], "grad_norms": []}
    for _ in range(STEPS):
        batch = [(torch.randint(0, VOCAB, (MBS, SEQ), generator=g), torch.randint(0, VOCAB, (MBS, SEQ), generator=g))
                 for _ in range(GLOBAL_BATCH // MBS)]
        per_rank = len(batch) // dp
        mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(mine), model=[model], num_microbatches=len(mine),
            seq_length=SEQ, micro_batch_size=MBS,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok
        loss = torch.stack([d["loss"] for d in losses]).mean()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        out["losses"].append(loss / dp)
        out["grad_norms"].append(grad_norm)
    out["params"] = {n: p.detach().clone() for n, p in inner.named_parameters()}
    return out


def test_dp2_distributed_optimizer_equals_dp1():
    dp2 = run_distributed(_train, world_size=2, timeout=180)
    (dp1,) = run_distributed(_train, world_size=1, timeout=180)
    assert dp1["losses"][-1] < dp1["losses"][0]  # it trains
    for r in dp2:
        torch.testing.assert_close(r["losses"], dp1["losses"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["grad_norms"], dp1["grad_norms"], atol=1e-6, rtol=1e-5)
        for name, p in dp1["params"].items():
            torch.testing.assert_close(r["params"][name], p, atol=1e-6, rtol=1e-5)

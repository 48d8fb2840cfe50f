"""PP=2 (1F1B, and interleaved virtual stages) equals PP=1 for a heterogeneous v1 stack: losses and gradients."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import reinit_model_parallel, run_distributed
from tests.models.helpers import build_model, global_name, randomize_tp_invariant, tiny_config

MICROBATCHES, MBS, SEQ, VOCAB = 4, 2, 12, 80
CFG = dict(num_layers=4, hidden_size=32, num_attention_heads=2, slstm_num_heads=2, xlstm_pattern="msms",
           mlstm_chunk_size=4)


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    output = model(tokens, None, None, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides the returned loss in place

    return output, loss_func


def _run(pp: int, vpp: int | None, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reinit_model_parallel(pp=pp, vpp=vpp)
    cfg = tiny_config("v1", pipeline_dtype=torch.float32, virtual_pipeline_model_parallel_size=vpp, **CFG)
    chunks = [build_model(cfg, VOCAB, SEQ, vp_stage=v if vpp else None) for v in range(vpp or 1)]
    for chunk in chunks:
        randomize_tp_invariant(chunk, seed=11)
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=[iter(batches) for _ in chunks] if vpp else iter(batches),
        model=chunks if vpp else chunks[0],
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    grads = {global_name(c, n): p.grad.clone() for c in chunks for n, p in c.named_parameters()}
    return [d["loss"] for d in losses], grads


def _pp_vs_reference(vpp: int | None, batches):
    return _run(2, vpp, batches), _run(1, None, batches)


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_pp2_equals_pp1(vpp):
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randint(0, VOCAB, (MBS, SEQ), generator=g), torch.randint(0, VOCAB, (MBS, SEQ), generator=g))
        for _ in range(MICROBATCHES)
    ]
    results = run_distributed(_pp_vs_reference, world_size=2, pp=2, vpp=vpp, args=(vpp, batches), timeout=240)
    (loss0, grads0), ref = results[0]
    (loss1, grads1), _ = results[1]
    ref_losses, ref_grads = ref
    assert loss0 == [] and len(loss1) == MICROBATCHES  # only the last stage computes the loss
    torch.testing.assert_close(torch.stack(loss1), torch.stack(ref_losses), atol=1e-5, rtol=1e-5)
    pp_grads = {**grads0, **grads1}
    assert not grads0.keys() & grads1.keys(), "a parameter lives on both stages"
    assert pp_grads.keys() == ref_grads.keys()
    for name, g_ref in ref_grads.items():
        torch.testing.assert_close(pp_grads[name], g_ref, atol=1e-5, rtol=1e-4, msg=name)

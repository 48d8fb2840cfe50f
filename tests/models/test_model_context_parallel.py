"""Context parallelism of the whole model: CP=2 (alone and with TP=2 + sequence parallel) equals CP=1 in logits,
per-token loss and gradients, for the Large block and the v1 mLSTM block (its conv halo). The batch is split as
Megatron's `get_batch_on_this_cp_rank` splits it (zigzag pieces); sLSTM layers refuse CP at construction."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import reinit_model_parallel, run_distributed
from tests.models.helpers import build_model, gather_full, randomize_tp_invariant, tiny_config


def _run(tp: int, cp: int, block: str, cfg_kwargs: dict, vocab: int, tokens, labels):
    """(logits, per-token loss) of this rank's CP pieces and the full gradients (summed over CP, gathered over TP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
    from megatron.core.utils import get_batch_on_this_cp_rank

    reinit_model_parallel(tp=tp, context_parallel_size=cp)
    cfg = tiny_config(block, context_parallel_size=cp, sequence_parallel=tp > 1, **cfg_kwargs)
    model = build_model(cfg, vocab, tokens.shape[1])
    randomize_tp_invariant(model, seed=7, std=0.2)
    batch = {"tokens": tokens, "labels": labels}
    if cp > 1:
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=ps.get_context_parallel_group())
    logits = gather_from_tensor_model_parallel_region(model(batch["tokens"], None, None))
    loss = model(batch["tokens"], None, None, labels=batch["labels"])
    loss.sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if getattr(p, "sequence_parallel", False):  # Megatron's finalize_model_grads does this all-reduce
            torch.distributed.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        torch.distributed.all_reduce(g, group=ps.get_context_parallel_group())  # DDP reduces over DP x CP
        grads[name] = gather_full(model, name, g, p)
    return logits.detach(), loss.detach(), grads


def _cp2_vs_cp1(tp: int, block: str, cfg_kwargs: dict, vocab: int, tokens, labels):
    from megatron.core import parallel_state as ps

    cp2 = _run(tp, 2, block, cfg_kwargs, vocab, tokens, labels)
    rank, size = ps.get_context_parallel_rank(), 2
    logits1, loss1, grads1 = _run(tp, 1, block, cfg_kwargs, vocab, tokens, labels)
    pieces = loss1.shape[1] // (2 * size)  # this rank's zigzag pieces of the CP=1 result
    mine = [slice(g * pieces, (g + 1) * pieces) for g in (rank, 2 * size - 1 - rank)]
    return cp2, (torch.cat([logits1[:, s] for s in mine], dim=1), torch.cat([loss1[:, s] for s in mine], dim=1), grads1)


CASES = {
    "large": (1, "large", dict(num_layers=2, hidden_size=32, num_attention_heads=2, mlstm_chunk_size=4)),
    "large-exact-tp2-sp": (2, "large", dict(num_layers=2, hidden_size=32, num_attention_heads=2, mlstm_chunk_size=3,
                                            mlstm_backward="exact")),
    "v1-mlstm": (1, "v1", dict(num_layers=2, hidden_size=32, num_attention_heads=2, xlstm_pattern="mm",
                               mlstm_chunk_size=4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cp2_equals_cp1(case):
    tp, block, cfg = CASES[case]
    vocab, S = 64, 32
    g = torch.Generator().manual_seed(5)
    tokens, labels = torch.randint(0, vocab, (2, S), generator=g), torch.randint(0, vocab, (2, S), generator=g)
    results = run_distributed(_cp2_vs_cp1, world_size=2 * tp, tp=tp, args=(tp, block, cfg, vocab, tokens, labels),
                              timeout=300)
    for (logits2, loss2, grads2), (logits1, loss1, grads1) in results:
        torch.testing.assert_close(logits2, logits1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loss2, loss1, atol=1e-4, rtol=1e-4)
        assert grads2.keys() == grads1.keys()
        for name in grads1:
            torch.testing.assert_close(grads2[name], grads1[name], atol=2e-4, rtol=2e-4, msg=name)


def _build_slstm_under_cp():
    from megatron.core import parallel_state as ps

    reinit_model_parallel(context_parallel_size=2)
    cfg = tiny_config("v1", context_parallel_size=2, num_layers=2, hidden_size=32, num_attention_heads=2,
                      slstm_num_heads=2, xlstm_pattern="ms")
    try:
        build_model(cfg, 64, 32)
    except ValueError as error:
        return str(error), ps.get_context_parallel_world_size()
    return None, ps.get_context_parallel_world_size()


def test_slstm_refuses_context_parallelism_in_one_line():
    for message, cp in run_distributed(_build_slstm_under_cp, world_size=2):
        assert cp == 2
        assert message is not None and "\n" not in message
        assert "sLSTM layers ('s') cannot be split over the sequence" in message

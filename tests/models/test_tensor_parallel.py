"""TP=2 (with and without sequence parallel) equals TP=1: logits, per-token loss and gathered gradients."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import reinit_model_parallel, run_distributed
from tests.models.helpers import build_model, gather_full, randomize_tp_invariant, tiny_config


def _run_tp(tp: int, sequence_parallel: bool, block: str, cfg_kwargs: dict, vocab: int, tokens, labels):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    reinit_model_parallel(tp=tp)
    cfg = tiny_config(block, sequence_parallel=sequence_parallel, **cfg_kwargs)
    model = build_model(cfg, vocab, tokens.shape[1])
    randomize_tp_invariant(model, seed=7, std=0.2)  # std 0.3 makes fp32 rounding noise reach 1e-4
    logits = gather_from_tensor_model_parallel_region(model(tokens, None, None))  # vocab-parallel -> full
    loss = model(tokens, None, None, labels=labels)
    loss.mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if getattr(p, "sequence_parallel", False):  # Megatron's finalize_model_grads does this all-reduce
            g = g.clone()
            torch.distributed.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        grads[name] = gather_full(model, name, g, p)
    return logits.detach(), loss.detach(), grads


def _tp2_vs_tp1(sequence_parallel: bool, block: str, cfg_kwargs: dict, vocab: int, tokens, labels):
    tp2 = _run_tp(2, sequence_parallel, block, cfg_kwargs, vocab, tokens, labels)
    tp1 = _run_tp(1, False, block, cfg_kwargs, vocab, tokens, labels)
    return tp2, tp1


CASES = {
    "large": ("large", dict(num_layers=2, hidden_size=64, num_attention_heads=4, mlstm_chunk_size=8)),
    "large-exact": ("large", dict(num_layers=1, hidden_size=32, num_attention_heads=2, mlstm_chunk_size=5,
                                  mlstm_backward="exact")),
    "v1": ("v1", dict(num_layers=3, hidden_size=64, num_attention_heads=4, slstm_num_heads=2, xlstm_pattern="msm",
                      mlstm_chunk_size=8)),
}


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_equals_tp1(case, sequence_parallel):
    block, cfg = CASES[case]
    vocab, S = 96, 16
    g = torch.Generator().manual_seed(3)
    tokens, labels = torch.randint(0, vocab, (2, S), generator=g), torch.randint(0, vocab, (2, S), generator=g)
    results = run_distributed(
        _tp2_vs_tp1, world_size=2, tp=2, args=(sequence_parallel, block, cfg, vocab, tokens, labels), timeout=240
    )
    for (logits2, loss2, grads2), (logits1, loss1, grads1) in results:
        torch.testing.assert_close(logits2, logits1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loss2, loss1, atol=1e-4, rtol=1e-4)
        assert grads2.keys() == grads1.keys()
        for name in grads1:
            torch.testing.assert_close(grads2[name], grads1[name], atol=1e-4, rtol=1e-4, msg=name)

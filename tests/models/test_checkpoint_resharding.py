"""Distributed checkpoints saved at TP=2/PP=2 load at TP=1/PP=1 and the reverse, with identical loss."""

from __future__ import annotations

import os

import pytest
import torch

from tests.megatron.dist import reinit_model_parallel, run_distributed
from tests.models.helpers import build_model, randomize_tp_invariant, tiny_config

SEQ, VOCAB, MBS, MICROBATCHES = 12, 64, 2, 2
CASES = {
    "large": ("large", dict(num_layers=2, hidden_size=32, num_attention_heads=2, mlstm_chunk_size=4)),
    "v1": ("v1", dict(num_layers=4, hidden_size=32, num_attention_heads=2, slstm_num_heads=2, xlstm_pattern="msms",
                      mlstm_chunk_size=4)),
}


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    output = model(tokens, None, None, labels=labels)
    # The schedule divides the returned loss in place; report a separate tensor.
    return output, lambda out: (out.float().mean(), {"loss": out.float().mean().detach().clone()})


def _losses(model, batches) -> list[torch.Tensor] | None:
    """Per-microbatch losses, on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(batches), model=model, num_microbatches=len(batches),
        seq_length=SEQ, micro_batch_size=MBS, forward_only=True,
    )
    return [d["loss"] for d in out] if ps.is_pipeline_last_stage() else None


def _build(block: str, cfg: dict, tp: int, pp: int):
    reinit_model_parallel(tp=tp, pp=pp)
    return build_model(tiny_config(block, pipeline_dtype=torch.float32, **cfg), VOCAB, SEQ)


def _save_then_load(block: str, cfg: dict, save_layout, load_layout, ckpt_dir: str, batches, seed: int):
    from megatron.core import dist_checkpointing

    model = _build(block, cfg, *save_layout)
    randomize_tp_invariant(model, seed=seed)
    saved_losses = _losses(model, batches)
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    torch.distributed.barrier()

    model = _build(block, cfg, *load_layout)  # a fresh, differently initialised model
    before = _losses(model, batches)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    return saved_losses, before, _losses(model, batches)


def _both_directions(block: str, cfg: dict, tmp: str, batches):
    a = _save_then_load(block, cfg, (2, 2), (1, 1), f"{tmp}/tp2pp2", batches, seed=1)
    b = _save_then_load(block, cfg, (1, 1), (2, 2), f"{tmp}/tp1pp1", batches, seed=2)
    return a, b


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_reshards_tp2pp2_to_tp1pp1_and_back(case, tmp_path):
    block, cfg = CASES[case]
    g = torch.Generator().manual_seed(9)
    batches = [(torch.randint(0, VOCAB, (MBS, SEQ), generator=g), torch.randint(0, VOCAB, (MBS, SEQ), generator=g))
               for _ in range(MICROBATCHES)]
    results = run_distributed(_both_directions, world_size=4, args=(block, cfg, str(tmp_path), batches), timeout=300)
    # Ranks 0..3: at TP2/PP2 the last stage holds ranks 2 and 3; at TP1/PP1 (DP=4) every rank computes the loss.
    (saved_a, _, _), (_, _, loaded_b) = results[3]
    (_, before_a, loaded_a), (saved_b, before_b, _) = results[0]
    saved_a, loaded_b = torch.stack(saved_a), torch.stack(loaded_b)
    loaded_a, saved_b = torch.stack(loaded_a), torch.stack(saved_b)
    torch.testing.assert_close(loaded_a, saved_a, atol=1e-5, rtol=1e-5)  # TP2/PP2 -> TP1/PP1
    torch.testing.assert_close(loaded_b, saved_b, atol=1e-5, rtol=1e-5)  # TP1/PP1 -> TP2/PP2
    assert not torch.allclose(torch.stack(before_a), saved_a), "the fresh model already had the saved weights"

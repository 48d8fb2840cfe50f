"""Packed documents through the whole model: a row of several documents, with the attention mask Megatron's dataset
builds under `--reset-attention-mask` (or THD `packed_seq_params`), gives each document the logits and gradients it
gets alone. Large and v1 (mLSTM + sLSTM, their convs), one-token documents, a document starting on a chunk
boundary; also under context parallelism (CP=2 equals CP=1 on the packed batch)."""

from __future__ import annotations

import pytest
import torch

from tests.megatron.dist import reinit_model_parallel, run_distributed
from tests.models.helpers import build_model, randomize_tp_invariant, tiny_config

EOD, VOCAB, S = 0, 64, 32
# EOD ends a document (it belongs to it); documents start at 0, 5, 6 (one token: EOD at 5 and 6), 8 (a chunk
# boundary at chunk size 4), 19 in row 0; at 0 and 30 in row 1
EODS = ([4, 5, 7, 18], [29])

CASES = {
    "large": ("large", dict(num_layers=2, hidden_size=32, num_attention_heads=2, mlstm_chunk_size=4)),
    "v1": ("v1", dict(num_layers=2, hidden_size=32, num_attention_heads=2, slstm_num_heads=2, xlstm_pattern="ms",
                      mlstm_chunk_size=4)),
}


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(1, VOCAB, (len(EODS), S), generator=g)
    for row, eods in enumerate(EODS):
        tokens[row, eods] = EOD
    return tokens


def _megatron_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool (True = hidden), as GPTDataset builds it per sample under --reset-attention-mask."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    masks = [_get_ltor_masks_and_position_ids(row, EOD, False, True, False, True)[0] for row in tokens]
    return torch.stack(masks)


def _documents(row: int) -> list[slice]:
    bounds = [0, *(e + 1 for e in EODS[row] if e + 1 < S), S]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


def _packed_vs_alone(block: str, cfg_kwargs: dict, use_thd: bool):
    from megatron.core.packed_seq_params import PackedSeqParams

    reinit_model_parallel()
    model = build_model(tiny_config(block, **cfg_kwargs), VOCAB, S)
    randomize_tp_invariant(model, seed=3, std=0.2)
    tokens = _tokens()
    weight = torch.randn(*tokens.shape, VOCAB, generator=torch.Generator().manual_seed(1))
    rows = [0] if use_thd else range(len(EODS))
    if use_thd:  # one row of concatenated documents, offsets as cu_seqlens
        offsets = torch.tensor([d.start for d in _documents(0)] + [S], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=offsets, cu_seqlens_kv=offsets,
                                 max_seqlen_q=S, max_seqlen_kv=S)
        logits = model(tokens[:1], None, None, packed_seq_params=params)
    else:
        logits = model(tokens, None, _megatron_mask(tokens))
    (logits * weight[: logits.shape[0]]).sum().backward()
    packed = (logits.detach(), _grads(model))
    alone = torch.zeros_like(logits)
    for row in rows:
        for doc in _documents(row):
            out = model(tokens[row : row + 1, doc], None, None)
            (out * weight[row : row + 1, doc]).sum().backward()
            alone[row : row + 1, doc] = out.detach()
    return packed, (alone, _grads(model))


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_batch_equals_each_document_alone(case):
    block, cfg = CASES[case]
    for use_thd in (False, True):
        [(packed, alone)] = run_distributed(_packed_vs_alone, world_size=1, args=(block, cfg, use_thd))
        torch.testing.assert_close(packed[0], alone[0], atol=5e-5, rtol=1e-4)
        for name, ref in alone[1].items():  # fp32 sums in another order: tolerance scaled by the gradient's size
            torch.testing.assert_close(packed[1][name], ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4, msg=name)


def _packed_cp(cp: int):
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    reinit_model_parallel(context_parallel_size=cp)
    block, cfg = CASES["large"]
    model = build_model(tiny_config(block, context_parallel_size=cp, **cfg), VOCAB, S)
    randomize_tp_invariant(model, seed=3, std=0.2)
    tokens = _tokens()
    batch = {"tokens": tokens, "attention_mask": _megatron_mask(tokens)}
    if cp > 1:
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=ps.get_context_parallel_group())
    logits = model(batch["tokens"], None, batch["attention_mask"])
    logits.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        torch.distributed.all_reduce(g, group=ps.get_context_parallel_group())
    return logits.detach(), grads


def _packed_cp2_vs_cp1():
    from megatron.core import parallel_state as ps

    cp2 = _packed_cp(2)
    rank = ps.get_context_parallel_rank()
    logits1, grads1 = _packed_cp(1)
    piece = S // 4
    mine = torch.cat([logits1[:, g * piece : (g + 1) * piece] for g in (rank, 3 - rank)], dim=1)
    return cp2, (mine, grads1)


def test_packed_batch_under_context_parallelism_equals_cp1():
    """Document starts inside pieces and on piece boundaries (S / 4 = 8: the start at 8) reset the passed state."""
    for (logits2, grads2), (logits1, grads1) in run_distributed(_packed_cp2_vs_cp1, world_size=2):
        torch.testing.assert_close(logits2, logits1, atol=1e-5, rtol=1e-5)
        for name in grads1:
            torch.testing.assert_close(grads2[name], grads1[name], atol=1e-4, rtol=1e-4, msg=name)

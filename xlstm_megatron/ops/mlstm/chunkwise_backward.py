"""Chunkwise mLSTM backward with the stabilisers held fixed, on chunked tensors (layout of `chunkwise_forward`).

Given the gradient w.r.t. the numerator rows (dnum = dh / (normaliser + eps)) and optionally w.r.t. the denominator
rows q.n (dden), it returns the gradients of q, k, v, of the gate log weights and of the initial state, recomputing
every intra-chunk L x L quantity from the inputs and the saved inter-chunk states.

Gate gradients use that, with all stabilisers fixed, every term carries the log weight B_i - B_j + i_j
(B = global cumulative log sigmoid(f)); hence d i_j = k_j . dk_j and
d log sigmoid(f_t) = sum_{l >= t} (q_l . dq_l - k_l . dk_l) + <dC_S, C_S> + <dn_S, n_S>,
the last two terms for gradients flowing into the final state (which carries B_S).
With packed documents B restarts at every start: the sum over l stops at the end of t's document, the final-state
terms reach only the tokens after the last start, and a start token's own log f gets 0 (it multiplies the empty state).
"""

import torch
from torch import Tensor

from xlstm_megatron.ops.mlstm.chunkwise_forward import ChunkGates
from xlstm_megatron.ops.mlstm.common import segmented_scan


def _forget_gate_grad(db: Tensor, final_terms: list[Tensor], starts: Tensor | None) -> Tensor:
    """d log sigmoid(f_t) (BH, S') from db = q.dq - k.dk per token (BH, S') and the final-state terms
    <dC_S, C_S>, <dn_S, n_S> (each (BH,)).

    Without starts: reverse cumsum over the sequence plus the final-state terms everywhere. With starts: the reverse
    sum restarts at each document end, the final-state terms stop at the last start and start tokens get exactly 0.
    """
    if starts is None:
        dlog_f = db.flip(-1).cumsum(-1).flip(-1)
        for term in final_terms:
            dlog_f.add_(term[:, None])
        return dlog_f
    ends = torch.cat([starts[:, 1:], starts.new_zeros(starts.shape[0], 1)], dim=-1)
    dlog_f = segmented_scan(db.flip(-1), ends.flip(-1), torch.add, 0.0).flip(-1)
    after_last_start = starts.flip(-1).cumsum(-1).flip(-1) == 0
    for term in final_terms:
        dlog_f = dlog_f + term[:, None] * after_last_start
    return dlog_f.masked_fill_(starts, 0.0)


def chunkwise_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: ChunkGates,
    states: tuple[Tensor, Tensor, Tensor, Tensor],
    dnum: Tensor,
    dden: Tensor | None,
    dC_final: Tensor | None,
    dn_final: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """q, k (BH, NC, L, DQK); v, dnum (BH, NC, L, DV); dden (BH, NC, L); states (C_start, n_start, C_final, n_final)
    of `chunkwise_states`; dC_final (BH, DQK, DV), dn_final (BH, DQK).

    Returns dq, dk, dv, di (BH, NC, L), dlog_f (BH, NC * L), dC0 (BH, DQK, DV), dn0 (BH, DQK) or None (no n path).
    """
    BH, NC, L, DQK = q.shape
    C_start, n_start, C_final, n_final = states
    scale = DQK**-0.5
    decay = gates.decay(scale)
    s_bar = (q @ k.transpose(-2, -1)).mul_(decay)
    ds = dnum @ v.transpose(-2, -1)
    if dden is not None:
        ds.add_(dden[..., None])
    ds.mul_(decay)  # gradient w.r.t. q k^T (scale folded in)

    read, write, carry = gates.read(scale), gates.write(), gates.carry()
    q_read = q * read[..., None]

    # gradients w.r.t. the state after chunk c (the last one: the final state), by a reverse scan over chunks;
    # chunk c reads the state before it with q_read, which adds q_read^T dnum to the gradient of that state
    dC_read = q_read.transpose(-2, -1) @ dnum
    dC_end = torch.empty_like(dC_read)
    dC_end[:, -1] = 0.0 if dC_final is None else dC_final
    for c in range(NC - 1, 0, -1):
        torch.addcmul(dC_read[:, c], dC_end[:, c], carry[:, c, None, None], out=dC_end[:, c - 1])
    dC0 = torch.addcmul(dC_read[:, 0], dC_end[:, 0], carry[:, 0, None, None])
    has_n = dden is not None or dn_final is not None
    if has_n:
        dn_read = (q_read * dden[..., None]).sum(-2) if dden is not None else q.new_zeros(BH, NC, DQK)
        dn_end = torch.empty_like(dn_read)
        dn_end[:, -1] = 0.0 if dn_final is None else dn_final
        for c in range(NC - 1, 0, -1):
            torch.addcmul(dn_read[:, c], dn_end[:, c], carry[:, c, None], out=dn_end[:, c - 1])
        dn0 = torch.addcmul(dn_read[:, 0], dn_end[:, 0], carry[:, 0, None])

    dq_inter = dnum @ C_start.transpose(-2, -1)
    if dden is not None:
        dq_inter.add_(dden[..., None] * n_start[:, :, None, :])
    dq = (ds @ k).addcmul_(dq_inter, read[..., None])
    dk_inter = v @ dC_end.transpose(-2, -1)
    if has_n:
        dk_inter.add_(dn_end[:, :, None, :])
    dk = (ds.transpose(-2, -1) @ q).addcmul_(dk_inter, write[..., None])
    dv = (s_bar.transpose(-2, -1) @ dnum).add_((k * write[..., None]) @ dC_end)

    di = (k * dk).sum(-1)
    db = ((q * dq).sum(-1) - di).view(BH, NC * L)
    final_terms = [] if dC_final is None else [(dC_final * C_final).sum((-2, -1))]
    if dn_final is not None:
        final_terms.append((dn_final * n_final).sum(-1))
    starts = None if gates.starts is None else gates.starts.reshape(BH, NC * L)
    dlog_f = _forget_gate_grad(db, final_terms, starts)
    return dq, dk, dv, di, dlog_f, dC0, dn0 if has_n else None

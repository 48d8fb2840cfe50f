"""Packed documents (`doc_starts`): a packed sequence equals each document run alone from a zero state.

Every form (mLSTM recurrent / parallel / chunkwise with both backward semantics, sLSTM reference / fused, causal conv)
is checked in fp64 against per-document runs and against the plain references on the packed batch: outputs, final
states and gradients w.r.t. every input. Layouts include one-token documents and documents ending on chunk
boundaries; chunk sizes do and do not divide S.
"""

import pytest
import torch

import xlstm_megatron.ops.slstm.fused_torch as fused_torch
from tests.ops.test_mlstm_forms import _constant_reference
from xlstm_megatron.ops.conv import causal_conv1d, causal_conv1d_step
from xlstm_megatron.ops.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent
from xlstm_megatron.ops.mlstm.common import zero_state
from xlstm_megatron.ops.slstm import slstm, slstm_reference

F64 = torch.float64
S = 24
TOL = 1e-10


def _random_lengths(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < S:
        lengths.append(min(int(torch.randint(1, 8, (1,), generator=g)), S - sum(lengths)))
    return lengths


# per row: document lengths summing to S; "fixed" has one-token documents and starts at 8, 12, 16 (chunk boundaries)
LAYOUTS = {
    "fixed": ([5, 1, 2, 8, 1, 7], [1, 11, 4, 1, 1, 6]),
    "random": (_random_lengths(1), _random_lengths(2)),
}


def _documents(lengths: list[int]) -> list[tuple[int, int]]:
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _doc_starts(layout: str, mark_first: bool) -> torch.Tensor:
    starts = torch.zeros(len(LAYOUTS[layout]), S, dtype=torch.bool)
    for row, lengths in enumerate(LAYOUTS[layout]):
        for lo, _ in _documents(lengths):
            starts[row, lo] = lo > 0 or mark_first
    return starts


def _maxdiff(a, b) -> float:
    assert len(a) == len(b)
    return max((x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b, strict=True))


def _weights(shapes, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for shape in shapes]


def _finite(tensors) -> bool:
    return all(t.isfinite().all() for t in tensors)


# ------------------------------------------------------------------------------------------------------------ mLSTM


def _mlstm_inputs(*, seed: int, B: int = 2, NH: int = 2, DQK: int = 3, DV: int = 4, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S)]
    return [(torch.randn(s, generator=g, dtype=F64) * scale).requires_grad_() for s in shapes]


def _mlstm_state(*, seed: int, B: int = 2, NH: int = 2, DQK: int = 3, DV: int = 4):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, NH, DQK, DV), (B, NH, DQK), (B, NH)]
    return [torch.randn(s, generator=g, dtype=F64).requires_grad_() for s in shapes]


def _mlstm_per_document(run, ins, layout: str):
    """h (B, NH, S, DV) and the final state of each row's last document, each document run alone (doc_starts=None)."""
    hs, finals = [], []
    for row, lengths in enumerate(LAYOUTS[layout]):
        parts = []
        for lo, hi in _documents(lengths):
            h, state = run(*(t[row : row + 1, :, lo:hi] for t in ins))
            parts.append(h)
        hs.append(torch.cat(parts, dim=2))
        finals.append(state)
    return torch.cat(hs, dim=0), tuple(torch.cat(parts, dim=0) for parts in zip(*finals, strict=True))


def _mlstm_loss(h, state, *, with_m: bool):
    w_h, w_C, w_n, w_m = _weights([h.shape, *(t.shape for t in state)], seed=99)
    loss = (h * w_h).sum() + (state[0] * w_C).sum() + (state[1] * w_n).sum()
    return loss + (state[2] * w_m).sum() if with_m else loss


CHUNKS = [1, 4, 5, 7, 8, 24, 64]  # 4, 8, 24 divide S = 24; 5, 7 do not; 64 > S


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mark_first", [False, True])
def test_mlstm_recurrent_packed_equals_documents(layout, mark_first):
    ins = _mlstm_inputs(seed=1)
    starts = _doc_starts(layout, mark_first)
    h, state = mlstm_recurrent(*ins, doc_starts=starts, eps=0.1)
    h_doc, state_doc = _mlstm_per_document(lambda *x: mlstm_recurrent(*x, eps=0.1), ins, layout)
    assert _maxdiff([h, *state], [h_doc, *state_doc]) < TOL
    g = torch.autograd.grad(_mlstm_loss(h, state, with_m=True), ins)
    g_doc = torch.autograd.grad(_mlstm_loss(h_doc, state_doc, with_m=True), ins)
    assert _maxdiff(g, g_doc) < TOL


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("backward", ["exact", "constant"])
def test_mlstm_chunkwise_packed_equals_documents(layout, chunk, backward):
    """eps = 0.1 makes the stabiliser's own gradient (exact semantics) visible."""
    ins = _mlstm_inputs(seed=chunk)
    starts = _doc_starts(layout, mark_first=chunk % 2 == 0)
    kwargs = {"chunk_size": chunk, "backward": backward, "eps": 0.1, "return_final_state": True}
    h, state = mlstm_chunkwise(*ins, doc_starts=starts, **kwargs)
    h_doc, state_doc = _mlstm_per_document(lambda *x: mlstm_chunkwise(*x, **kwargs), ins, layout)
    assert _maxdiff([h, *state], [h_doc, *state_doc]) < TOL
    exact = backward == "exact"
    g = torch.autograd.grad(_mlstm_loss(h, state, with_m=exact), ins)
    g_doc = torch.autograd.grad(_mlstm_loss(h_doc, state_doc, with_m=exact), ins)
    assert _maxdiff(g, g_doc) < TOL


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mlstm_chunkwise_packed_equals_references(chunk, eps):
    """Exact semantics against autograd through the packed recurrent loop, constant against its detached copy."""
    ins = _mlstm_inputs(seed=10 + chunk)
    starts = _doc_starts("random", mark_first=False)
    kwargs = {"chunk_size": chunk, "eps": eps, "return_final_state": True, "doc_starts": starts}

    h_ref, st_ref = mlstm_recurrent(*ins, eps=eps, doc_starts=starts)
    h, st = mlstm_chunkwise(*ins, backward="exact", **kwargs)
    assert _maxdiff([h, *st], [h_ref, *st_ref]) < TOL
    g = torch.autograd.grad(_mlstm_loss(h, st, with_m=True), ins)
    assert _maxdiff(g, torch.autograd.grad(_mlstm_loss(h_ref, st_ref, with_m=True), ins)) < TOL

    zero = zero_state(ins[0], ins[2], ins[0].dtype)
    h_ref, st_ref = _constant_reference(*ins, zero, eps, doc_starts=starts)
    h, st = mlstm_chunkwise(*ins, backward="constant", **kwargs)
    assert _maxdiff([h, *st], [h_ref, *st_ref]) < TOL
    g = torch.autograd.grad(_mlstm_loss(h, st, with_m=False), ins)
    assert _maxdiff(g, torch.autograd.grad(_mlstm_loss(h_ref, st_ref, with_m=False), ins)) < TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mlstm_parallel_packed(layout):
    """Against per-document parallel runs (any eps) and the packed recurrent reference (eps = 0: no m_0 term)."""
    ins = _mlstm_inputs(seed=3)
    starts = _doc_starts(layout, mark_first=True)
    w = _weights([(2, 2, S, 4)], seed=5)[0]
    h = mlstm_parallel(*ins, doc_starts=starts)
    h_doc, _ = _mlstm_per_document(lambda *x: (mlstm_parallel(*x), (torch.zeros(1),) * 3), ins, layout)
    assert _maxdiff([h], [h_doc]) < TOL
    assert _maxdiff(torch.autograd.grad((h * w).sum(), ins), torch.autograd.grad((h_doc * w).sum(), ins)) < TOL

    h = mlstm_parallel(*ins, doc_starts=starts, eps=0.0)
    h_ref, _ = mlstm_recurrent(*ins, doc_starts=starts, eps=0.0)
    assert _maxdiff([h], [h_ref]) < TOL
    assert _maxdiff(torch.autograd.grad((h * w).sum(), ins), torch.autograd.grad((h_ref * w).sum(), ins)) < TOL


@pytest.mark.parametrize("backward", ["exact", "constant"])
@pytest.mark.parametrize("mark_first", [False, True])
def test_mlstm_initial_state_feeds_first_document_only(backward, mark_first):
    """Unmarked position 0: the initial state feeds the first document (gradients included); marked: it is dropped."""
    ins, init = _mlstm_inputs(seed=4), _mlstm_state(seed=5)
    starts = _doc_starts("fixed", mark_first)
    h, st = mlstm_chunkwise(*ins, initial_state=init, doc_starts=starts, chunk_size=5, eps=0.1, backward=backward,
                            return_final_state=True)
    h_ref, st_ref = mlstm_recurrent(*ins, initial_state=init, doc_starts=starts, eps=0.1)
    if backward == "exact":
        assert _maxdiff([h, *st], [h_ref, *st_ref]) < TOL
        g = torch.autograd.grad(_mlstm_loss(h, st, with_m=True), [*ins, *init], retain_graph=True)
        assert _maxdiff(g, torch.autograd.grad(_mlstm_loss(h_ref, st_ref, with_m=True), [*ins, *init])) < TOL
    h_none = mlstm_chunkwise(*ins, doc_starts=starts, chunk_size=5, eps=0.1)
    g_init = torch.autograd.grad(_mlstm_loss(h, st, with_m=False), init[:2], allow_unused=True)
    if mark_first:
        assert _maxdiff([h], [h_none]) < TOL
        assert all(gi is None or gi.abs().max() == 0 for gi in g_init)
    else:
        first = _documents(LAYOUTS["fixed"][0])[0][1]  # the end of row 0's first document
        assert _maxdiff([h[0, :, :first]], [h_none[0, :, :first]]) > 1e-3
        assert _maxdiff([h[0, :, first:]], [h_none[0, :, first:]]) < TOL
        assert g_init[0].abs().max() > 1e-3


@pytest.mark.parametrize("backward", ["exact", "constant"])
@pytest.mark.parametrize("split", [8, 11])
def test_mlstm_split_packed_sequence_carries_state(backward, split):
    """Slicing doc_starts with the sequence and carrying the state equals one pass (8 is a document start)."""
    ins, init = _mlstm_inputs(seed=6), _mlstm_state(seed=7)
    starts = _doc_starts("fixed", mark_first=False)
    assert starts[0, 8]
    kwargs = {"chunk_size": 4, "backward": backward, "eps": 0.1, "return_final_state": True}

    def run(parts):
        state, hs = init, []
        for lo, hi in parts:
            h, state = mlstm_chunkwise(*(t[:, :, lo:hi] for t in ins), initial_state=state,
                                       doc_starts=starts[:, lo:hi], **kwargs)
            hs.append(h)
        h = torch.cat(hs, 2)
        return [h, *state, *torch.autograd.grad(_mlstm_loss(h, state, with_m=False), [*ins, *init[:2]])]

    assert _maxdiff(run([(0, S)]), run([(0, split), (split, S)])) < TOL


def test_mlstm_doc_starts_none_is_unchanged():
    ins = _mlstm_inputs(seed=8)
    for backward in ("exact", "constant"):
        h, st = mlstm_chunkwise(*ins, chunk_size=5, backward=backward, return_final_state=True)
        h2, st2 = mlstm_chunkwise(*ins, chunk_size=5, backward=backward, return_final_state=True, doc_starts=None)
        assert all(torch.equal(a, b) for a, b in zip([h, *st], [h2, *st2], strict=True))
        g, g2 = (torch.autograd.grad(_mlstm_loss(x, y, with_m=False), ins) for x, y in ((h, st), (h2, st2)))
        assert all(torch.equal(a, b) for a, b in zip(g, g2, strict=True))
        # no start at all: the segmented bookkeeping gives the same values
        none_marked = torch.zeros(2, S, dtype=torch.bool)
        h3 = mlstm_chunkwise(*ins, chunk_size=5, backward=backward, doc_starts=none_marked)
        assert _maxdiff([h3], [h]) < TOL
    assert torch.equal(mlstm_parallel(*ins), mlstm_parallel(*ins, doc_starts=None))
    assert all(torch.equal(a, b) for a, b in zip(mlstm_recurrent(*ins)[1], mlstm_recurrent(*ins, doc_starts=None)[1],
                                                 strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlstm_extreme_gates_packed_finite(dtype):
    """Gates of +-1e4 with many documents (including one-token ones): finite values and gradients in every form."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, S, 4, generator=g).to(dtype).requires_grad_() for _ in range(3))
    i, f = ((torch.randint(0, 2, (2, 2, S), generator=g) * 2e4 - 1e4).to(dtype).requires_grad_() for _ in range(2))
    ins = [q, k, v, i, f]
    starts = _doc_starts("fixed", mark_first=True)
    h_rec, (C, n, m) = mlstm_recurrent(*ins, doc_starts=starts)
    outputs = [mlstm_parallel(*ins, doc_starts=starts), h_rec.float().sum() + C.sum() + n.sum()]
    for backward in ("exact", "constant"):
        for chunk in (1, 5, 8):
            h, (C, n, m) = mlstm_chunkwise(*ins, chunk_size=chunk, backward=backward, doc_starts=starts,
                                           return_final_state=True)
            assert _finite([h, C, n, m])
            outputs.append(h.float().sum() + C.sum() + n.sum())
    for out in outputs:
        assert _finite([out])
        assert _finite(torch.autograd.grad(out.sum(), ins))


# ------------------------------------------------------------------------------------------------------------ sLSTM


def _slstm_inputs(*, seed: int, B: int = 2, NH: int = 2, DH: int = 3, scale: float = 1.0, with_state: bool = False):
    g = torch.Generator().manual_seed(seed)
    wx = torch.randn(B, S, NH, 4, DH, generator=g, dtype=F64) * scale
    r = torch.randn(NH, DH, 4, DH, generator=g, dtype=F64) * (0.5 / DH**0.5)
    b = torch.randn(NH, 4, DH, generator=g, dtype=F64)
    ins = [t.requires_grad_() for t in (wx, r, b)]
    if not with_state:
        return ins, None
    n = torch.rand(B, NH, DH, generator=g, dtype=F64) * 2 + 0.5
    c = (torch.rand(B, NH, DH, generator=g, dtype=F64) * 2 - 1) * n
    y, m = torch.rand(B, NH, DH, generator=g, dtype=F64) * 2 - 1, torch.randn(B, NH, DH, generator=g, dtype=F64)
    return ins, tuple(t.requires_grad_() for t in (y, c, n, m))


def _slstm_loss(y, state):
    weights = _weights([y.shape, *(s.shape for s in state)], seed=77)
    return sum((t * w).sum() for t, w in zip([y, *state], weights, strict=True))


def _slstm_per_document(fn, wx, r, b, layout, forget_gate):
    ys, finals = [], []
    for row, lengths in enumerate(LAYOUTS[layout]):
        parts = []
        for lo, hi in _documents(lengths):
            y, state = fn(wx[row : row + 1, lo:hi], r, b, forget_gate=forget_gate)
            parts.append(y)
        ys.append(torch.cat(parts, dim=1))
        finals.append(state)
    return torch.cat(ys, dim=0), tuple(torch.cat(parts, dim=0) for parts in zip(*finals, strict=True))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("fn", [slstm_reference, slstm], ids=["reference", "fused"])
def test_slstm_packed_equals_documents(layout, forget_gate, fn):
    (wx, r, b), _ = _slstm_inputs(seed=1, scale=2.0)
    starts = _doc_starts(layout, mark_first=forget_gate == "exp")
    y, state = fn(wx, r, b, forget_gate=forget_gate, doc_starts=starts)
    y_doc, state_doc = _slstm_per_document(fn, wx, r, b, layout, forget_gate)
    assert _maxdiff([y, *state], [y_doc, *state_doc]) < TOL
    g = torch.autograd.grad(_slstm_loss(y, state), (wx, r, b))
    assert _maxdiff(g, torch.autograd.grad(_slstm_loss(y_doc, state_doc), (wx, r, b))) < TOL


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("mark_first", [False, True])
@pytest.mark.parametrize("chunk_elements", [None, 7])
def test_slstm_fused_packed_equals_reference(forget_gate, with_state, mark_first, chunk_elements, monkeypatch):
    if chunk_elements is not None:  # several backward coefficient chunks, resets at chunk edges
        monkeypatch.setattr(fused_torch, "_CHUNK_ELEMENTS", chunk_elements)
    (wx, r, b), init = _slstm_inputs(seed=2, scale=2.0, with_state=with_state)
    starts = _doc_starts("random", mark_first)
    leaves = [wx, r, b, *(init or ())]
    results = []
    for fn in (slstm_reference, slstm):
        y, state = fn(wx, r, b, initial_state=init, forget_gate=forget_gate, doc_starts=starts)
        results.append([y, *state, *torch.autograd.grad(_slstm_loss(y, state), leaves, allow_unused=True)])
    zero_if_none = [t if t is not None else torch.zeros(1, dtype=F64) for t in results[0]]
    assert _maxdiff(results[1], zero_if_none) < TOL
    if with_state and mark_first:  # every row drops the initial state
        assert all(g.abs().max() == 0 for g in results[1][-4:])


@pytest.mark.parametrize("split", [8, 11])
def test_slstm_split_packed_sequence_carries_state(split):
    (wx, r, b), init = _slstm_inputs(seed=3, with_state=True)
    starts = _doc_starts("fixed", mark_first=False)
    y, state = slstm(wx, r, b, initial_state=init, doc_starts=starts)
    y_a, st_a = slstm(wx[:, :split], r, b, initial_state=init, doc_starts=starts[:, :split])
    y_b, st_b = slstm(wx[:, split:], r, b, initial_state=st_a, doc_starts=starts[:, split:])
    assert _maxdiff([y, *state], [torch.cat([y_a, y_b], 1), *st_b]) < TOL


def test_slstm_doc_starts_none_is_unchanged():
    (wx, r, b), init = _slstm_inputs(seed=4, with_state=True)
    for fn in (slstm_reference, slstm):
        y, state = fn(wx, r, b, initial_state=init)
        y2, state2 = fn(wx, r, b, initial_state=init, doc_starts=None)
        assert all(torch.equal(a, c) for a, c in zip([y, *state], [y2, *state2], strict=True))
        g, g2 = (torch.autograd.grad(_slstm_loss(a, c), (wx, r, b)) for a, c in ((y, state), (y2, state2)))
        assert all(torch.equal(a, c) for a, c in zip(g, g2, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_slstm_extreme_inputs_packed_finite(dtype, forget_gate):
    (wx, r, b), _ = _slstm_inputs(seed=5, scale=1e3)
    wx, r, b = (t.detach().to(dtype).requires_grad_() for t in (wx, r, b))
    starts = _doc_starts("fixed", mark_first=False)
    for fn in (slstm_reference, slstm):
        y, state = fn(wx, r, b, forget_gate=forget_gate, doc_starts=starts)
        assert _finite([y, *state])
        assert _finite(torch.autograd.grad(y.sum() + sum(s.sum() for s in state), (wx, r, b)))


# ------------------------------------------------------------------------------------------------------------- conv


def _conv_inputs(k: int, *, seed: int, channels: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, S, channels, generator=g, dtype=F64)
    weight, bias = torch.randn(channels, k, generator=g, dtype=F64), torch.randn(channels, generator=g, dtype=F64)
    state = torch.randn(2, k - 1, channels, generator=g, dtype=F64)
    return [t.requires_grad_() for t in (x, weight, bias, state)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("mark_first", [False, True])
def test_conv_packed_equals_documents(layout, k, mark_first):
    x, weight, bias, _ = _conv_inputs(k, seed=k)
    starts = _doc_starts(layout, mark_first)
    y, new_state = causal_conv1d(x, weight, bias, doc_starts=starts, return_state=True)
    ys, states = [], []
    for row, lengths in enumerate(LAYOUTS[layout]):
        parts = [causal_conv1d(x[row : row + 1, lo:hi], weight, bias, return_state=True) for lo, hi in
                 _documents(lengths)]
        ys.append(torch.cat([p[0] for p in parts], dim=1))
        last_len = lengths[-1]  # the carried state of a short last document is zero-padded, as from a zero state
        states.append(parts[-1][1] if last_len >= k - 1 else torch.cat(
            [torch.zeros(1, k - 1 - last_len, x.shape[-1], dtype=F64), x[row : row + 1, S - last_len :]], dim=1))
    y_doc, state_doc = torch.cat(ys), torch.cat(states)
    assert _maxdiff([y, new_state], [y_doc, state_doc]) < TOL
    w, w_state = _weights([y.shape, new_state.shape], seed=12)

    def grads(out, st):
        return torch.autograd.grad((out * w).sum() + (st * w_state).sum(), (x, weight, bias))

    assert _maxdiff(grads(y, new_state), grads(y_doc, state_doc)) < TOL


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("split", [8, 11, 17])
def test_conv_split_and_steps_carry_state(k, split):
    """Split at a document start (8), mid-document, and token by token with the step form: all equal one pass."""
    x, weight, bias, state = _conv_inputs(k, seed=20 + k)
    starts = _doc_starts("fixed", mark_first=False)
    y, last = causal_conv1d(x, weight, bias, state=state, doc_starts=starts, return_state=True)
    y_a, st = causal_conv1d(x[:, :split], weight, bias, state=state, doc_starts=starts[:, :split], return_state=True)
    y_b, st = causal_conv1d(x[:, split:], weight, bias, state=st, doc_starts=starts[:, split:], return_state=True)
    assert _maxdiff([y, last], [torch.cat([y_a, y_b], 1), st]) < TOL
    st, steps = state, []
    for t in range(S):
        y_t, st = causal_conv1d_step(x[:, t], weight, bias, st, doc_starts=starts[:, t])
        steps.append(y_t)
    assert _maxdiff([y], [torch.stack(steps, 1)]) < TOL
    # the initial state feeds the first document only, and not at all when position 0 is marked
    y_zero = causal_conv1d(x, weight, bias, doc_starts=starts)
    first = _documents(LAYOUTS["fixed"][0])[0][1]
    assert _maxdiff([y[0, first:]], [y_zero[0, first:]]) < TOL and _maxdiff([y[0, :1]], [y_zero[0, :1]]) > 1e-6
    y_marked = causal_conv1d(x, weight, bias, state=state, doc_starts=_doc_starts("fixed", mark_first=True))
    assert _maxdiff([y_marked], [y_zero]) < TOL


def test_conv_doc_starts_none_is_unchanged():
    x, weight, bias, state = _conv_inputs(4, seed=30)
    y, st = causal_conv1d(x, weight, bias, state=state, return_state=True)
    y2, st2 = causal_conv1d(x, weight, bias, state=state, return_state=True, doc_starts=None)
    assert torch.equal(y, y2) and torch.equal(st, st2)
    y3 = causal_conv1d(x, weight, bias, state=state, doc_starts=torch.zeros(2, S, dtype=torch.bool))
    assert _maxdiff([y3], [y]) < TOL

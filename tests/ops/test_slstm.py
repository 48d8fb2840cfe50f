"""sLSTM fast path vs the per-step reference: equality, gradients, carried state, stability."""

import pytest
import torch

import xlstm_megatron.ops.slstm.fused_torch as fused_torch
from xlstm_megatron.ops.slstm import slstm, slstm_reference
from xlstm_megatron.ops.slstm.common import log_sigmoid

F64 = torch.float64


def make_inputs(bsz, seq, nh, dh, *, dtype=F64, seed=0, scale=1.0, with_state=False, requires_grad=True):
    """Random (wx, r, b, state); the state is a valid sLSTM state (n > 0, |c| <= n)."""
    g = torch.Generator().manual_seed(seed)
    wx = torch.randn(bsz, seq, nh, 4, dh, generator=g, dtype=F64) * scale
    r = torch.randn(nh, dh, 4, dh, generator=g, dtype=F64) * (0.5 / dh**0.5)
    b = torch.randn(nh, 4, dh, generator=g, dtype=F64)
    state = None
    if with_state:
        n = torch.rand(bsz, nh, dh, generator=g, dtype=F64) * 2 + 0.5
        c = (torch.rand(bsz, nh, dh, generator=g, dtype=F64) * 2 - 1) * n
        y = torch.rand(bsz, nh, dh, generator=g, dtype=F64) * 2 - 1
        m = torch.randn(bsz, nh, dh, generator=g, dtype=F64)
        state = tuple(s.to(dtype).requires_grad_(requires_grad) for s in (y, c, n, m))
    wx, r, b = (t.to(dtype).requires_grad_(requires_grad) for t in (wx, r, b))
    return wx, r, b, state


def loss_of(y, state, seed=1):
    """A scalar touching the output and every final-state component with fixed random weights."""
    g = torch.Generator().manual_seed(seed)
    total = (y.double() * torch.randn(y.shape, generator=g, dtype=F64)).sum()
    for s in state:
        total = total + (s.double() * torch.randn(s.shape, generator=g, dtype=F64)).sum()
    return total


def run(fn, wx, r, b, state, forget_gate):
    y, final = fn(wx, r, b, initial_state=state, forget_gate=forget_gate)
    inputs = [t for t in (wx, r, b, *(state or ())) if t.requires_grad]
    grads = torch.autograd.grad(loss_of(y, final), inputs)
    return [y, *final, *grads]


def assert_all_close(got, want, atol, rtol=0.0):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, k
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, k=k: f"tensor {k}: {m}")


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 1, 3), (3, 9, 2, 4), (2, 17, 3, 8)])
@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk_elements", [None, 7])
def test_fast_equals_reference_fp64(shape, forget_gate, with_state, chunk_elements, monkeypatch):
    if chunk_elements is not None:  # several backward coefficient chunks, including a partial one
        monkeypatch.setattr(fused_torch, "_CHUNK_ELEMENTS", chunk_elements)
    wx, r, b, state = make_inputs(*shape, seed=sum(shape), scale=2.0, with_state=with_state)
    got = run(slstm, wx, r, b, state, forget_gate)
    want = run(slstm_reference, wx, r, b, state, forget_gate)
    assert_all_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_stabiliser_ties_follow_autograd(forget_gate):
    """ĩ == m + log f exactly (constant ĩ, log f == 0): both paths split the max/min gradients like autograd."""
    wx, r, b, _ = make_inputs(2, 6, 1, 3, requires_grad=False)
    wx[..., 0, :] = 0.5
    wx[..., 1, :] = 0.0 if forget_gate == "exp" else 1e4  # log f == 0 exactly
    b.zero_()
    r.zero_()
    for t in (wx, r, b):
        t.requires_grad_()
    assert_all_close(run(slstm, wx, r, b, None, forget_gate), run(slstm_reference, wx, r, b, None, forget_gate),
                     atol=1e-12)


def test_all_zero_test_is_over_the_whole_state():
    """Batch entries with a zero state next to valid ones: the first step uses max(ĩ, m + log f) for all (vanilla)."""
    wx, r, b, state = make_inputs(3, 6, 2, 4, seed=3, with_state=True, requires_grad=False)
    y0, c0, n0, m0 = (s.clone() for s in state)
    for s in (y0, c0, n0, m0):
        s[1] = 0.0
    state = tuple(s.requires_grad_() for s in (y0, c0, n0, m0))
    for t in (wx, r, b):
        t.requires_grad_()
    assert_all_close(run(slstm, wx, r, b, state, "sigmoid"), run(slstm_reference, wx, r, b, state, "sigmoid"),
                     atol=1e-10)


def test_zero_initial_state_equals_none():
    wx, r, b, _ = make_inputs(2, 5, 2, 3, requires_grad=False)
    zeros = tuple(torch.zeros(2, 2, 3, dtype=F64) for _ in range(4))
    for fn in (slstm, slstm_reference):
        y_none, s_none = fn(wx, r, b)
        y_zero, s_zero = fn(wx, r, b, initial_state=zeros)
        assert_all_close([y_none, *s_none], [y_zero, *s_zero], atol=0.0)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_split_sequence_with_carried_state_equals_one_pass(forget_gate):
    wx, r, b, state = make_inputs(2, 13, 2, 4, seed=5, scale=2.0, with_state=True)
    full = run(slstm, wx, r, b, state, forget_gate)
    ys, carried = [], state
    for piece in torch.split(wx, [5, 4, 4], dim=1):
        y, carried = slstm(piece, r, b, initial_state=carried, forget_gate=forget_gate)
        ys.append(y)
    y = torch.cat(ys, dim=1)
    grads = torch.autograd.grad(loss_of(y, carried), [wx, r, b, *state])
    assert_all_close([y, *carried, *grads], full, atol=1e-12)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("with_state", [False, True])
def test_gradcheck_fast(forget_gate, with_state):
    wx, r, b, state = make_inputs(2, 4, 2, 2, seed=7, with_state=with_state)
    inputs = (wx, r, b, *(state or ()))

    def fn(wx, r, b, *state):
        y, final = slstm(wx, r, b, initial_state=state or None, forget_gate=forget_gate)
        return (y, *final)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_reference():
    wx, r, b, state = make_inputs(1, 3, 2, 2, seed=8, with_state=True)

    def fn(wx, r, b, *state):
        y, final = slstm_reference(wx, r, b, initial_state=state, forget_gate="sigmoid")
        return (y, *final)

    assert torch.autograd.gradcheck(fn, (wx, r, b, *state))


def test_partial_requires_grad():
    wx, r, b, _ = make_inputs(2, 5, 2, 3, requires_grad=False)
    wx.requires_grad_()
    assert_all_close(run(slstm, wx, r, b, None, "sigmoid"), run(slstm_reference, wx, r, b, None, "sigmoid"),
                     atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    wx, r, b, state = make_inputs(2, 12, 2, 8, dtype=dtype, seed=9, with_state=True)
    got = run(slstm, wx, r, b, state, "sigmoid")
    want = run(slstm_reference, wx, r, b, state, "sigmoid")
    assert got[0].dtype == dtype and all(s.dtype == torch.float32 for s in got[1:5])
    assert [g.dtype for g in got[5:]] == [dtype] * 7
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_all_close(got, want, atol=tol, rtol=tol)
    # Internal math is fp32 even under a bf16 autocast region.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, _ = slstm(wx, r, b, initial_state=state)
    torch.testing.assert_close(y_ac, got[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_huge_preactivations_stay_finite(dtype, forget_gate):
    """Pre-activations of +-1e4: finite outputs and gradients, and both paths agree (the official vanilla backend
    returns NaN gradients here: autograd's 0 * inf through min(exp(x), 1) at the first step)."""
    wx, r, b, _ = make_inputs(2, 32, 2, 4, dtype=dtype, seed=10, requires_grad=False)
    wx = (torch.randn(wx.shape, generator=torch.Generator().manual_seed(11)).sign() * 1e4).to(dtype)
    r = (r.float() * 100).to(dtype)
    for t in (wx, r, b):
        t.requires_grad_()
    got = run(slstm, wx, r, b, None, forget_gate)
    want = run(slstm_reference, wx, r, b, None, forget_gate)
    for out in (got, want):
        assert all(torch.isfinite(t).all() for t in out)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_all_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("seq", "dtype", "forget_gate"),
    [(16384, torch.float32, "sigmoid"), (4096, torch.bfloat16, "sigmoid"), (4096, torch.float32, "exp")],
)
def test_long_sequence_finite_and_close_to_fp64(seq, dtype, forget_gate):
    wx, r, b, _ = make_inputs(1, seq, 1, 2, seed=12, scale=3.0, requires_grad=False)
    wx64, r64, b64 = (t.clone().requires_grad_() for t in (wx, r, b))
    wx, r, b = (t.to(dtype).requires_grad_() for t in (wx, r, b))
    out = run(slstm, wx, r, b, None, forget_gate)
    assert all(torch.isfinite(t).all() for t in out)
    assert out[0].abs().max() <= 1.0 + 1e-2  # |c| <= n, so |y| <= 1
    if dtype == torch.float32:  # no drift over the sequence: matches an fp64 run of the same inputs
        y64 = slstm(wx64, r64, b64, forget_gate=forget_gate)[0]
        torch.testing.assert_close(out[0].double(), y64, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"wx": (2, 3, 2, 3, 4)}, "wx must be"),
        ({"r": (2, 4, 4, 3)}, "r must be"),
        ({"b": (2, 4, 3)}, "b must be"),
        ({"forget_gate": "tanh"}, "forget_gate"),
    ],
)
def test_invalid_inputs_raise(kwargs, match):
    wx, r, b, _ = make_inputs(2, 3, 2, 4, requires_grad=False)
    wx = torch.zeros(kwargs["wx"]) if "wx" in kwargs else wx
    r = torch.zeros(kwargs["r"]) if "r" in kwargs else r
    b = torch.zeros(kwargs["b"]) if "b" in kwargs else b
    for fn in (slstm, slstm_reference):
        with pytest.raises(ValueError, match=match):
            fn(wx, r, b, forget_gate=kwargs.get("forget_gate", "sigmoid"))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_sigmoid_matches_torch(dtype):
    x = torch.tensor([-1e4, -300.0, -41.0, -39.0, -20.5, -1.0, -1e-8, 0.0, 1e-8, 2.0, 25.0, 45.0, 1e4], dtype=dtype)
    x.requires_grad_()
    ours, theirs = log_sigmoid(x), torch.nn.functional.logsigmoid(x)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    tol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(ours, theirs, atol=0, rtol=tol)
    torch.testing.assert_close(g_ours, g_theirs, atol=0, rtol=tol)

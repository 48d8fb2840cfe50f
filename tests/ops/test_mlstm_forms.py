"""mLSTM cell forms against each other in fp64: parallel, recurrent and chunkwise (both backward semantics)."""

import pytest
import torch
import torch.nn.functional as F

from xlstm_megatron.ops.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_recurrent_step

F64 = torch.float64


def _inputs(B, NH, S, DQK, DV, *, seed, dtype=F64, scale=1.0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(dtype).requires_grad_(grad)

    return rnd(B, NH, S, DQK), rnd(B, NH, S, DQK), rnd(B, NH, S, DV), rnd(B, NH, S), rnd(B, NH, S, shift=1.0)


def _state(B, NH, DQK, DV, *, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(B, NH, DQK, DV, generator=g, dtype=F64)
    n = torch.randn(B, NH, DQK, generator=g, dtype=F64)
    m = torch.randn(B, NH, generator=g, dtype=F64)
    return tuple(t.requires_grad_(grad) for t in (C, n, m))


def _maxdiff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _constant_reference(q, k, v, i, f, state, eps, doc_starts=None):
    """Recurrent loop with every stabiliser and normaliser detached: autograd gives the "constant" semantics. With
    `doc_starts` (B, S) the state restarts from zero at each marked token (packed documents)."""
    C, n, m = state
    m, s, hs = m.detach(), q.shape[-1] ** -0.5, []
    for t in range(q.shape[2]):
        if doc_starts is not None:
            keep = ~doc_starts[:, t, None]
            C, n, m = C * keep[..., None, None], n * keep[..., None], m * keep
        log_f = F.logsigmoid(f[:, :, t])
        m_new = torch.maximum(log_f + m, i[:, :, t]).detach()
        f_act, i_act = torch.exp(log_f + m - m_new)[..., None], torch.exp(i[:, :, t] - m_new)[..., None]
        C = f_act[..., None] * C + (i_act * k[:, :, t])[..., :, None] * v[:, :, t, None, :]
        n = f_act * n + i_act * k[:, :, t]
        qs = q[:, :, t] * s
        den = (qs * n).sum(-1, keepdim=True)
        normaliser = torch.maximum(den.abs(), torch.exp(-m_new)[..., None]).detach()
        hs.append((qs[..., None, :] @ C).squeeze(-2) / (normaliser + eps))
        m = m_new
    return torch.stack(hs, 2), (C, n, m)


SHAPES_CHUNKS = [(1, 1), (7, 1), (37, 4), (37, 5), (37, 37), (37, 64), (64, 16), (64, 64), (20, 7), (5, 64)]


@pytest.mark.parametrize(("S", "chunk"), SHAPES_CHUNKS)
def test_forms_agree_fp64(S, chunk):
    q, k, v, i, f = _inputs(2, 2, S, 5, 7, seed=S * 100 + chunk)
    h_par = mlstm_parallel(q, k, v, i, f, eps=0.0)
    h_rec, st_rec = mlstm_recurrent(q, k, v, i, f, eps=0.0)
    h_chk, st_chk = mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk, eps=0.0, return_final_state=True)
    assert h_chk.dtype == F64 and h_chk.shape == v.shape
    assert _maxdiff([h_chk, h_chk], [h_par, h_rec]) < 1e-10
    assert _maxdiff(st_chk, st_rec) < 1e-10
    # chunkwise and recurrent share the row stabiliser, so they also agree with eps > 0
    h_rec_eps, _ = mlstm_recurrent(q, k, v, i, f, eps=1e-2)
    assert _maxdiff([mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk, eps=1e-2)], [h_rec_eps]) < 1e-10


def test_step_from_empty_state_equals_zero_state():
    q, k, v, i, f = (t[:, :, 0] for t in _inputs(2, 3, 1, 4, 6, seed=1))
    h0, s0 = mlstm_recurrent_step(q, k, v, i, f, None)
    zeros = (torch.zeros(2, 3, 4, 6, dtype=F64), torch.zeros(2, 3, 4, dtype=F64), torch.zeros(2, 3, dtype=F64))
    h1, s1 = mlstm_recurrent_step(q, k, v, i, f, zeros)
    assert _maxdiff([h0, *s0], [h1, *s1]) == 0.0


@pytest.mark.parametrize("chunk", [1, 4, 6, 64])
@pytest.mark.parametrize("backward", ["exact", "constant"])
def test_split_sequence_equals_one_pass(chunk, backward):
    """Carrying the state across a split gives the one-pass outputs, final state and gradients."""
    S, split = 29, 11
    ins = _inputs(2, 2, S, 5, 7, seed=chunk, grad=True)
    init = _state(2, 2, 5, 7, seed=chunk + 1, grad=True)
    w = torch.randn(2, 2, S, 7, dtype=F64)

    def run(parts):
        state, hs = init, []
        for lo, hi in parts:
            part = (t[:, :, lo:hi] for t in ins)
            kwargs = {"chunk_size": chunk, "backward": backward, "return_final_state": True}
            h, state = mlstm_chunkwise(*part, initial_state=state, **kwargs)
            hs.append(h)
        h = torch.cat(hs, 2)
        loss = (h * w).sum() + state[0].sum() + state[1].square().sum()
        return [h, *state, *torch.autograd.grad(loss, [*ins, init[0], init[1]])]

    assert _maxdiff(run([(0, S)]), run([(0, split), (split, S)])) < 1e-10

    h_one, st_one = mlstm_recurrent(*ins, initial_state=init)
    h_a, st_a = mlstm_recurrent(*(t[:, :, :split] for t in ins), initial_state=init)
    h_b, st_b = mlstm_recurrent(*(t[:, :, split:] for t in ins), initial_state=st_a)
    assert _maxdiff([h_one, *st_one], [torch.cat([h_a, h_b], 2), *st_b]) < 1e-10


@pytest.mark.parametrize(("S", "chunk"), [(37, 1), (37, 8), (37, 64), (48, 16), (3, 64)])
def test_exact_chunkwise_grads_equal_parallel_autograd(S, chunk):
    ins = _inputs(2, 2, S, 5, 7, seed=S + chunk, grad=True)
    w = torch.randn(2, 2, S, 7, dtype=F64)
    if S > 3:  # both normaliser branches occur: |q.n| and its floor (with v = 1, h = den / max(|den|, 1))
        den = mlstm_parallel(*ins[:2], torch.ones(2, 2, S, 1, dtype=F64), *ins[3:], eps=0.0)
        assert 0.1 < (den.abs() < 1 - 1e-9).double().mean() < 0.9
    g_par = torch.autograd.grad((mlstm_parallel(*ins, eps=0.0) * w).sum(), ins)
    g_chk = torch.autograd.grad((mlstm_chunkwise(*ins, chunk_size=chunk, eps=0.0) * w).sum(), ins)
    assert _maxdiff(g_chk, g_par) < 1e-10


def _all_state_loss(h, state, seed):
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in (h, *state))


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_exact_chunkwise_grads_with_states_equal_recurrent_autograd(chunk, eps):
    """Initial and final state (C, n, m) included; eps = 0.1 makes the stabiliser's own gradient visible."""
    ins = _inputs(2, 2, 23, 5, 7, seed=chunk, grad=True)
    init = _state(2, 2, 5, 7, seed=7, grad=True)
    h, st = mlstm_recurrent(*ins, initial_state=init, eps=eps)
    g_rec = torch.autograd.grad(_all_state_loss(h, st, 3), [*ins, *init])
    h, st = mlstm_chunkwise(*ins, chunk_size=chunk, initial_state=init, return_final_state=True, eps=eps)
    g_chk = torch.autograd.grad(_all_state_loss(h, st, 3), [*ins, *init])
    assert _maxdiff(g_chk, g_rec) < 1e-10


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_constant_chunkwise_grads_equal_detached_reference(chunk, eps):
    ins = _inputs(2, 2, 23, 5, 7, seed=chunk + 10, grad=True)
    init = _state(2, 2, 5, 7, seed=8, grad=True)
    h, (C, n, _) = _constant_reference(*ins, init, eps)
    g_ref = torch.autograd.grad(_all_state_loss(h, (C, n), 4), [*ins, init[0], init[1]])
    h, (C, n, m) = mlstm_chunkwise(
        *ins, chunk_size=chunk, initial_state=init, return_final_state=True, eps=eps, backward="constant"
    )
    assert not m.requires_grad  # the stabiliser is a constant in this semantics
    g_chk = torch.autograd.grad(_all_state_loss(h, (C, n), 4), [*ins, init[0], init[1]])
    assert _maxdiff(g_chk, g_ref) < 1e-10


def test_semantics_share_forward_and_value_gradient():
    ins = _inputs(1, 2, 30, 4, 6, seed=5, grad=True)
    w = torch.randn(1, 2, 30, 6, dtype=F64)
    h_e, h_c = (mlstm_chunkwise(*ins, chunk_size=8, backward=b) for b in ("exact", "constant"))
    assert torch.equal(h_e, h_c)
    ge, gc = (torch.autograd.grad((h * w).sum(), ins) for h in (h_e, h_c))
    assert (ge[2] - gc[2]).abs().max() < 1e-12
    assert (ge[0] - gc[0]).abs().max() > 1e-3  # q (and k, i, f) genuinely differ between the semantics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward", ["exact", "constant"])
def test_low_precision_inputs_run_in_fp32(dtype, backward):
    """bf16/fp16 inputs: h and gradients are the fp32 computation on the upcast inputs, cast back."""
    ins = [t.detach().requires_grad_() for t in _inputs(2, 2, 21, 8, 8, seed=6, dtype=dtype)]
    ins32 = [t.detach().float().requires_grad_() for t in ins]
    dh = torch.randn(2, 2, 21, 8).to(dtype)
    h, (C, _, _) = mlstm_chunkwise(*ins, chunk_size=8, backward=backward, return_final_state=True)
    h32 = mlstm_chunkwise(*ins32, chunk_size=8, backward=backward)
    assert h.dtype == dtype and C.dtype == torch.float32
    assert torch.equal(h, h32.to(dtype))
    h.backward(dh)
    h32.backward(dh.float())
    for a, b in zip(ins, ins32, strict=True):
        assert a.grad.dtype == dtype and torch.equal(a.grad, b.grad.to(dtype))


# ---------------------------------------------------------------------------------------------------- gradcheck


def test_gradcheck_parallel():
    ins = _inputs(1, 2, 6, 3, 4, seed=20, grad=True)
    assert torch.autograd.gradcheck(lambda *x: mlstm_parallel(*x, eps=1e-2), ins)


def test_gradcheck_recurrent():
    ins = _inputs(1, 1, 4, 3, 4, seed=21, grad=True)
    init = _state(1, 1, 3, 4, seed=22, grad=True)

    def fn(*x):
        h, state = mlstm_recurrent(*x[:5], initial_state=x[5:], eps=1e-2)
        return h, *state

    assert torch.autograd.gradcheck(fn, (*ins, *init))


@pytest.mark.parametrize("chunk", [2, 16])
def test_gradcheck_chunkwise_exact(chunk):
    """All inputs including (C0, n0, m0), all outputs including the final (C, n, m); eps large enough to matter."""
    ins = _inputs(1, 1, 5, 3, 4, seed=23, grad=True)
    init = _state(1, 1, 3, 4, seed=24, grad=True)

    def fn(*x):
        h, state = mlstm_chunkwise(*x[:5], chunk_size=chunk, initial_state=x[5:], return_final_state=True, eps=0.1)
        return h, *state

    assert torch.autograd.gradcheck(fn, (*ins, *init))


@pytest.mark.parametrize("chunk", [2, 16])
def test_gradcheck_chunkwise_constant(chunk):
    """With eps = 0 and |true q.n| < 1 the normaliser is exp(-m) and h, C*exp(m), n*exp(m) do not depend on any
    stabiliser: there the constant semantics is the true gradient, and finite differences can check it."""
    q, k, v, i, f = _inputs(1, 1, 5, 3, 4, seed=25, scale=0.3, grad=True)
    C0, n0, m0 = _state(1, 1, 3, 4, seed=26)
    C0, n0 = (0.3 * C0).requires_grad_(), (0.3 * n0).requires_grad_()

    def fn(q, k, v, i, f, C0, n0):
        kwargs = {"chunk_size": chunk, "return_final_state": True, "eps": 0.0, "backward": "constant"}
        h, (C, n, m) = mlstm_chunkwise(q, k, v, i, f, initial_state=(C0, n0, m0), **kwargs)
        return h, C * m.exp()[..., None, None], n * m.exp()[..., None]

    # the regime: true denominators below 1 (the chunkwise h with v = 1 and C0 = n0 is den / max(|den|, 1))
    ones = torch.ones(1, 1, 5, 1, dtype=F64)
    den = mlstm_chunkwise(q, k, ones, i, f, chunk_size=chunk, initial_state=(n0[..., None], n0, m0), eps=0.0)
    assert den.abs().max() < 0.9
    assert torch.autograd.gradcheck(fn, (q, k, v, i, f, C0, n0))


# ---------------------------------------------------------------------------------------------------- memory


def test_chunkwise_saves_linear_memory():
    """Bytes saved for backward are affine in S (no S x S tensor) and a few times the inputs."""

    def saved_bytes(S, backward):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        ins = _inputs(1, 2, S, 8, 8, seed=0, dtype=torch.float32, grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlstm_chunkwise(*ins, chunk_size=16, backward=backward)
        return total

    for backward in ("exact", "constant"):
        b1, b2, b4 = (saved_bytes(S, backward) for S in (512, 1024, 2048))
        assert b4 - b2 == 2 * (b2 - b1)
        assert b4 < 4 * (2048 * 2 * (8 + 8 + 8 + 2)) * 4  # < 4x the input bytes; S x S would be 8 MiB per head


# ---------------------------------------------------------------------------------------------------- stability


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backward", ["exact", "constant"])
def test_chunkwise_extreme_gates_long_sequence_finite(dtype, backward):
    S = 16384
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, 4, generator=g).to(dtype).requires_grad_() for _ in range(3))
    i, f = ((torch.randint(0, 2, (1, 2, S), generator=g) * 2e4 - 1e4).to(dtype).requires_grad_() for _ in range(2))
    h, (C, n, m) = mlstm_chunkwise(q, k, v, i, f, return_final_state=True, backward=backward)
    assert h.dtype == dtype and C.dtype == torch.float32
    assert all(t.isfinite().all() for t in (h, C, n, m))
    (h.float().sum() + C.sum() + n.sum()).backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v, i, f))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parallel_and_recurrent_extreme_gates_finite(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 48, 4, generator=g).to(dtype).requires_grad_() for _ in range(3))
    i, f = ((torch.randint(0, 2, (1, 2, 48), generator=g) * 2e4 - 1e4).to(dtype).requires_grad_() for _ in range(2))
    h_par = mlstm_parallel(q, k, v, i, f)
    h_rec, state = mlstm_recurrent(q, k, v, i, f)
    (h_par.float().sum() + h_rec.float().sum() + state[0].sum()).backward()
    assert h_par.isfinite().all() and h_rec.isfinite().all()
    assert all(t.grad.isfinite().all() for t in (q, k, v, i, f))

"""mLSTM cell against the official implementations (fp32, random shapes and weights).

- mlstm_kernels: native parallel, chunkwise (autograd = exact semantics, custbw = constant semantics) and recurrent
  sequence kernels. Their states match ours (unscaled k, m0 = 0); their m state has a trailing singleton axis.
- xlstm v1 `parallel_stabilized_simple`: gates as (B, NH, S, 1), k scaled inside by sqrt(DH of q).
All use eps = 1e-6 like ours. Forward tolerance 1e-5 relative to max|h|, gradients 1e-4 relative (norm).
"""

import pytest
import torch
from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd, mlstm_chunkwise__native_custbw
from mlstm_kernels.torch.parallel.native import mlstm_parallel__native_autograd
from mlstm_kernels.torch.recurrent.native_sequence import mlstm_recurrent_sequence__native_fw
from xlstm.blocks.mlstm.backends import parallel_stabilized_simple

from xlstm_megatron.ops.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent

SEEDS = range(4)


def _case(seed: int, *, chunk: int | None = None, state: bool = False):
    """Random shape and inputs; S a multiple of `chunk` (the oracle's chunkwise kernels require it)."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[torch.randint(len(options), (1,), generator=g).item()]

    B, NH, DQK, DV = pick([1, 2]), pick([1, 3]), pick([8, 16]), pick([8, 24])
    S = pick([2, 3, 4]) * chunk if chunk else pick([17, 32, 45])

    def rnd(*shape, shift=0.0):
        return (torch.randn(*shape, generator=g) + shift).requires_grad_()

    ins = (rnd(B, NH, S, DQK), rnd(B, NH, S, DQK), rnd(B, NH, S, DV), rnd(B, NH, S), rnd(B, NH, S, shift=2.0))
    init = (rnd(B, NH, DQK, DV), rnd(B, NH, DQK), rnd(B, NH)) if state else None
    return ins, init, torch.randn(B, NH, S, DV, generator=g)


def _close_fwd(ours, ref):
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def _close_grads(ours, ref, rtol=1e-4):
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).norm() <= rtol * b.norm() + 1e-6, (a - b).norm() / b.norm()


def _grads(h, w, inputs):
    return torch.autograd.grad((h * w).sum(), inputs)


@pytest.mark.parametrize("seed", SEEDS)
def test_parallel_vs_mlstm_kernels_and_v1(seed):
    ins, _, w = _case(seed)
    q, k, v, i, f = ins
    ours = mlstm_parallel(*ins)
    mk = mlstm_parallel__native_autograd(*ins)
    v1 = parallel_stabilized_simple(q, k, v, i[..., None], f[..., None])
    _close_fwd(ours, mk)
    _close_fwd(ours, v1)
    g = _grads(ours, w, ins)
    _close_grads(g, _grads(mk, w, ins))
    _close_grads(g, _grads(v1, w, ins))


@pytest.mark.parametrize("seed", SEEDS)
def test_chunkwise_exact_vs_v1_parallel(seed):
    """Different stabiliser (m_0 term) from the parallel form: agreement up to O(eps), far inside the tolerance."""
    ins, _, w = _case(seed)
    q, k, v, i, f = ins
    ours = mlstm_chunkwise(*ins, chunk_size=8)
    v1 = parallel_stabilized_simple(q, k, v, i[..., None], f[..., None])
    _close_fwd(ours, v1)
    _close_grads(_grads(ours, w, ins), _grads(v1, w, ins))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk", [4, 16])
def test_chunkwise_exact_vs_mlstm_kernels_autograd(seed, chunk):
    ins, init, w = _case(seed, chunk=chunk, state=True)
    C0, n0, m0 = init
    h, (C, n, m) = mlstm_chunkwise(*ins, chunk_size=chunk, initial_state=init, return_final_state=True)
    h_mk, (C_mk, n_mk, m_mk) = mlstm_chunkwise__native_autograd(
        *ins, c_initial=C0, n_initial=n0, m_initial=m0[..., None], return_last_states=True, chunk_size=chunk
    )
    _close_fwd(h, h_mk)
    _close_fwd(C, C_mk)
    _close_fwd(n, n_mk)
    _close_fwd(m, m_mk[..., 0])
    inputs = [*ins, C0, n0, m0]
    loss, loss_mk = ((h * w).sum() + C.sum() + n.sum()), ((h_mk * w).sum() + C_mk.sum() + n_mk.sum())
    _close_grads(torch.autograd.grad(loss, inputs), torch.autograd.grad(loss_mk, inputs))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk", [4, 16])
def test_chunkwise_constant_vs_mlstm_kernels_custbw(seed, chunk):
    """The oracle gives no gradient to n0, m0 and none from the final state into the gates: compare h-gradients and
    the C0 gradient (it returns zeros for n0, ours has no path to n0 either)."""
    ins, init, w = _case(seed, chunk=chunk, state=True)
    C0, n0, m0 = init
    h = mlstm_chunkwise(*ins, chunk_size=chunk, initial_state=init, backward="constant")
    h_mk = mlstm_chunkwise__native_custbw(*ins, c_initial=C0, n_initial=n0, m_initial=m0[..., None], chunk_size=chunk)
    _close_fwd(h, h_mk)
    inputs = [*ins, C0]
    _close_grads(_grads(h, w, inputs), _grads(h_mk, w, inputs))


@pytest.mark.parametrize("seed", SEEDS)
def test_recurrent_and_chunkwise_vs_mlstm_kernels_sequence(seed):
    ins, init, _ = _case(seed, state=True)
    C0, n0, m0 = (t.detach() for t in init)
    ins = [t.detach() for t in ins]
    h_mk, (C_mk, n_mk, m_mk) = mlstm_recurrent_sequence__native_fw(
        *ins, c_initial=C0, n_initial=n0, m_initial=m0[..., None], return_last_states=True
    )
    h_rec, st_rec = mlstm_recurrent(*ins, initial_state=(C0, n0, m0))
    h_chk, st_chk = mlstm_chunkwise(*ins, chunk_size=8, initial_state=(C0, n0, m0), return_final_state=True)
    for h, (C, n, m) in ((h_rec, st_rec), (h_chk, st_chk)):
        _close_fwd(h, h_mk)
        _close_fwd(C, C_mk)
        _close_fwd(n, n_mk)
        _close_fwd(m, m_mk[..., 0])

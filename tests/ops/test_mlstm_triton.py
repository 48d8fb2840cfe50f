"""Triton chunkwise mLSTM against the torch chunkwise reference.

- CPU: every case runs under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so one
  worker subprocess runs all cases and reports max errors as JSON; this process never imports the kernels).
- CPU: the kernels' launch resources are checked ahead of time in test_kernel_resources.py.
- GPU (skipped without CUDA): bf16 / fp32 kernels vs the fp32 torch reference, with autotuning.
"""

import importlib.util
import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.ops.triton_interpreter import assert_guarded_without_triton, raised_types, run_worker_in_interpreter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

REPO = Path(__file__).resolve().parents[2]

# name: (B, NH, S, chunk, DQK, DV, dtype, backward, initial state, loss on the final state, fixed tile cap,
#        input-gate shift, recompute the chunk states in backward); a tile cap of 16 gives several row blocks per
#        chunk and several DQK / DV tiles
CASES = {
    "tiny_one_chunk": (1, 2, 8, 8, 16, 16, "float32", "constant", False, False, 64, 0.0, True),
    "ragged_state": (2, 2, 37, 16, 16, 32, "float32", "constant", True, True, 64, 0.0, True),
    "exact_state": (1, 2, 40, 8, 32, 16, "float32", "exact", True, True, 64, 0.0, True),
    "exact_h_only": (1, 2, 23, 8, 16, 16, "float32", "exact", True, False, 64, 0.0, True),
    "odd_sizes": (1, 2, 21, 5, 12, 20, "float32", "constant", True, True, 64, 0.0, True),
    "chunk_gt_seq": (1, 2, 5, 64, 16, 16, "float32", "exact", False, True, 64, 0.0, True),
    "one_token": (1, 2, 1, 8, 16, 16, "float32", "constant", True, True, 64, 0.0, True),
    "multi_tile": (1, 2, 40, 40, 32, 48, "float32", "constant", True, True, 16, 0.0, True),
    "multi_tile_exact": (1, 1, 34, 32, 40, 32, "float32", "exact", True, True, 16, 0.0, True),
    "fp16_state": (1, 2, 33, 16, 32, 32, "float16", "constant", True, True, 64, 0.0, True),
    "fp16_exact": (2, 2, 24, 8, 16, 16, "float16", "exact", False, True, 64, 0.0, True),
    "fp16_multi_tile": (1, 2, 48, 32, 32, 32, "float16", "constant", True, True, 16, 0.0, True),
    "many_chunks": (1, 1, 70, 8, 16, 16, "float32", "constant", True, True, 64, 0.0, True),
    "tiny_gates_floor": (1, 2, 30, 8, 16, 16, "float32", "exact", False, True, 64, -30.0, True),
    "saved_states": (2, 2, 37, 16, 16, 32, "float32", "constant", True, True, 16, 0.0, False),
    "saved_states_exact": (1, 1, 34, 8, 40, 32, "float32", "exact", True, True, 16, 0.0, False),
    "saved_states_fp16": (1, 2, 33, 16, 32, 32, "float16", "exact", False, True, 64, 0.0, False),
    "floor_clamped": (1, 2, 30, 8, 16, 16, "float32", "exact", False, True, 64, -100.0, True),
    "fp16_out_of_range": (1, 2, 33, 16, 32, 32, "float16", "exact", True, True, 16, 0.0, True),
}
# per-case input scales: q, k x200 make the fp32 score tiles (q k^T D in the forward and the dv kernel) exceed fp16's
# 65,504 before their dots while h and the gradients stay in range (all fp16 dot operands are scaled by one code
# path); floor_clamped: m <= -100, where exp(-m) is above the fp32 range
SCALES = {"fp16_out_of_range": {"qk": 200.0}}
# max |triton - reference| / max(1, max |reference|), per dtype
TOL = {"float32": 2e-5, "float16": 5e-3}


def _worker(cases: dict) -> dict:
    """Runs in a subprocess with TRITON_INTERPRET=1: fwd + bwd of every case, triton vs torch (fp32 reference)."""
    from xlstm_megatron.ops.mlstm import mlstm_chunkwise
    from xlstm_megatron.ops.mlstm.triton import launch, mlstm_chunkwise_triton

    results = {}
    for name, case in cases.items():
        B, NH, S, chunk, DQK, DV, dtype, backward, with_state, state_loss, cap, i_shift, recompute = case
        launch.FIXED_TILE_CAP = cap
        g = torch.Generator().manual_seed(len(results))
        shapes = [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S)]
        seq = [torch.randn(s, generator=g) for s in shapes]
        scales = SCALES.get(name, {})
        seq[:2] = [t * scales.get("qk", 1.0) for t in seq[:2]]
        seq[:3] = [t.to(getattr(torch, dtype)).float() for t in seq[:3]]  # the reference sees the same q, k, v
        seq[3] += i_shift  # -30: exp(-m) exceeds |q.n|, the normaliser floor is active
        seq[4] += 1.0
        state = [torch.randn(s, generator=g) for s in ((B, NH, DQK, DV), (B, NH, DQK), (B, NH))] if with_state else []
        weights = [torch.randn(s, generator=g) for s in ((B, NH, S, DV), (B, NH, DQK, DV), (B, NH, DQK), (B, NH))]
        outs = {}
        for impl, dt in (("triton", getattr(torch, dtype)), ("torch", torch.float32)):
            ins = [t.to(dt if j < 3 else torch.float32).clone().requires_grad_() for j, t in enumerate(seq)]
            st = [t.clone().requires_grad_() for t in state]
            fn = mlstm_chunkwise if impl == "torch" else partial(mlstm_chunkwise_triton, recompute_states=recompute)
            h, (C, n, m) = fn(
                *ins, chunk_size=chunk, initial_state=tuple(st) or None, return_final_state=True, backward=backward
            )
            loss = (h.float() * weights[0]).sum()
            if state_loss:
                loss = loss + (C * weights[1]).sum() + (n * weights[2]).sum()
                if backward == "exact":
                    loss = loss + (m * weights[3]).sum()
            loss.backward()
            grads = [t.grad for t in ins + st]
            grad_names = ["dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"]
            outs[impl] = {"h": h, "C": C, "n": n, "m": m} | dict(zip(grad_names, grads, strict=False))
        res = {}
        for key, ref in outs["torch"].items():
            got = outs["triton"].get(key)
            if ref is None or got is None:
                res[key] = None if ref is None and got is None else "missing"
                continue
            if not torch.isfinite(ref).all():
                res[key] = "reference not finite"
                continue
            err = (got.float() - ref.float()).abs().max().item()
            res[key] = err / max(1.0, ref.abs().max().item())
            if key == "h":  # relative to the output's own scale too (tiny gates make h tiny)
                res["h_rel"] = err / max(1e-30, ref.abs().max().item())
        results[name] = res
    launch.FIXED_TILE_CAP = 64
    results["validation"] = _validation_errors(mlstm_chunkwise_triton)
    results["saved_bytes"] = {str(r): _saved_bytes(mlstm_chunkwise_triton, r) for r in (True, False)}
    results["segments"] = _segmented_forward(mlstm_chunkwise, mlstm_chunkwise_triton)
    return results


def _segmented_forward(reference, fn) -> dict:
    """Forward in segments of 2 chunks (7 chunks): the largest state buffer the forward allocates, and the errors of
    h, the final state and the gradients against the torch chunkwise."""
    from xlstm_megatron.ops.mlstm.triton import function

    B, NH, S, chunk, DQK, DV = SAVED_SHAPE
    g = torch.Generator().manual_seed(7)
    ins = [torch.randn(s, generator=g) for s in ((B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S),
                                                 (B, NH, S))]
    allocated, buffers, segment_chunks = [], function._state_buffers, function.segment_chunks
    function.segment_chunks = lambda *a: 2
    function._state_buffers = lambda BH, chunks, *a: allocated.append(chunks) or buffers(BH, chunks, *a)
    outs = []
    try:
        for impl in (fn, reference):
            x = [t.clone().requires_grad_() for t in ins]
            h, (C, n, m) = impl(*x, chunk_size=chunk, return_final_state=True, backward="constant")
            forward_allocs = list(allocated)
            (h.sum() + C.sum() + n.sum()).backward()
            outs.append([h, C, n, m] + [t.grad for t in x])
            if impl is fn:
                fwd_chunks = forward_allocs
    finally:
        function.segment_chunks, function._state_buffers = segment_chunks, buffers
    errs = [(a - b).abs().max().item() / max(1.0, b.abs().max().item()) for a, b in zip(*outs, strict=True)]
    return {"forward_state_chunks": fwd_chunks, "chunks": -(-S // chunk), "max_err": max(errs)}


SAVED_SHAPE = (2, 3, 100, 16, 16, 32)  # B, NH, S, chunk, DQK, DV: 7 chunks


def _saved_bytes(fn, recompute: bool) -> int:
    """Bytes the Triton mLSTM saves for backward (saved-tensor hooks see `ctx.save_for_backward`)."""
    B, NH, S, chunk, DQK, DV = SAVED_SHAPE
    ins = [torch.randn(s, requires_grad=True) for s in ((B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV))]
    ins += [torch.randn(B, NH, S, requires_grad=True) for _ in range(2)]
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*ins, chunk_size=chunk, recompute_states=recompute).sum().backward()
    return total


def _validation_errors(fn) -> dict:
    """Exception type raised for each bad call (None if none was raised)."""
    q, v, g = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8)
    bad = {
        "fp64": lambda: fn(q.double(), q.double(), v.double(), g, g),
        "mixed_dtypes": lambda: fn(q.half(), q, v, g, g),
        "shapes": lambda: fn(q, q, v[:, :, :4], g, g),
        "chunk_size": lambda: fn(q, q, v, g, g, chunk_size=0),
        "backward": lambda: fn(q, q, v, g, g, backward="approx"),
        "grid": lambda: fn(*(t.expand(65536, *t.shape[1:]) for t in (q, q, v, g, g))),  # B * NH = 131,072
    }
    return raised_types(bad)


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_worker_in_interpreter(__file__, CASES, timeout=900)


def test_interpreter_rejects_bad_inputs(interpreter_results):
    assert interpreter_results["validation"] == {
        "fp64": "TypeError", "mixed_dtypes": "TypeError", "shapes": "ValueError", "chunk_size": "ValueError",
        "backward": "ValueError", "grid": "ValueError",
    }


def test_floor_clamp_is_finite_in_fp32():
    """exp of the floor's largest exponent is finite in fp32 (ln(FLT_MAX) itself rounds up to an inf exp)."""
    from xlstm_megatron.ops.mlstm.triton import kernels_forward
    from xlstm_megatron.ops.mlstm.triton.function import FLOOR_MAX_EXPONENT, finite_floor

    assert kernels_forward.FLOOR_MAX_EXPONENT.value == FLOOR_MAX_EXPONENT
    assert torch.isfinite(torch.exp(torch.tensor(FLOOR_MAX_EXPONENT, dtype=torch.float32)))
    assert torch.isfinite(finite_floor(torch.tensor([-1e4, -100.0, 0.0]))).all()


def test_dq_dk_partial_sums_cover_every_candidate_tiling():
    """The per-DQK-tile partial sums are sized for the smallest tile any candidate (tuned or fixed) can run with, so
    the backward never needs to know which configuration the autotuner picked (its shared state)."""
    from xlstm_megatron.ops.mlstm.triton import launch

    for DQK in (16, 40, 64, 96, 256):
        for tune in (True, False):
            for dtype in (torch.float32, torch.bfloat16):
                meta = {"L": 64, "DQK": DQK, "DV": 128, **launch.dtype_meta(dtype)}
                tiles = {-(-DQK // c["BK"]) for name in ("bwd_dq", "bwd_dk")
                         for c in launch.candidate_configs(name, meta, tune)}
                assert launch.max_dqk_tiles(meta, tune) == max(tiles)


def test_package_imports_without_triton_and_stays_off_the_torch_path():
    assert_guarded_without_triton("xlstm_megatron.ops.mlstm.triton", "mlstm_chunkwise_triton")


@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_matches_torch_chunkwise(interpreter_results, case):
    """Outputs, final states and the gradients of q, k, v, i, f and the initial state equal the torch chunkwise."""
    res = interpreter_results[case]
    tol = TOL[CASES[case][6]]
    assert "missing" not in res.values() and "reference not finite" not in res.values(), res
    bad = {k: v for k, v in res.items() if v is not None and not v <= tol}  # `not <=` also catches nan
    assert not bad, f"errors above {tol}: {bad}"
    expected = {"h", "C", "n", "m", "dq", "dk", "dv", "di", "df"}
    assert expected <= {k for k, v in res.items() if v is not None}


def test_forward_without_kept_states_holds_one_segment(interpreter_results):
    """With recompute_states the forward scans and reads out segments: no state buffer beyond a segment's chunks
    (2 here, of 7), and the same results and gradients as the torch chunkwise."""
    seg = interpreter_results["segments"]
    assert seg["chunks"] == 7 and max(seg["forward_state_chunks"]) == 2 and len(seg["forward_state_chunks"]) == 4
    assert seg["max_err"] <= TOL["float32"]


@pytest.mark.parametrize("DQK, DV, chunk, B, NH, S, bytes_per", [(256, 512, 64, 8, 8, 8192, 2), (256, 512, 128, 8, 8,
                                                                 65536, 2), (64, 128, 16, 2, 3, 100, 4)])
def test_segments_hold_at_most_the_bytes_of_v(DQK, DV, chunk, B, NH, S, bytes_per):
    """The forward's transient states (fp32 C, n of a segment's chunks) fit in the bytes of v, with as many chunks as
    fit (at least one); at the 7B heads a fraction of the full 4 GiB (B 8, S 8192, chunk 64)."""
    from xlstm_megatron.ops.mlstm.triton.function import segment_chunks

    NC, BH = -(-S // chunk), B * NH
    per_chunk = BH * (DQK * DV + DQK) * 4
    v_bytes = BH * S * DV * bytes_per
    seg = segment_chunks(BH, NC, DQK, DV, v_bytes)
    assert 1 <= seg <= NC
    assert seg * per_chunk <= max(v_bytes, per_chunk)
    assert seg == NC or (seg + 1) * per_chunk > v_bytes


def test_recomputing_the_chunk_states_saves_them(interpreter_results):
    """With recompute_states, backward keeps the initial C, n instead of the fp32 C, n before every chunk."""
    B, NH, S, chunk, DQK, DV = SAVED_SHAPE
    chunks = -(-S // chunk)
    state_bytes = B * NH * (DQK * DV + DQK) * 4
    saved = interpreter_results["saved_bytes"]
    assert saved["False"] - saved["True"] == (chunks - 1) * state_bytes


GPU_CASES = [  # (B, NH, S, chunk, DQK, DV, dtype, tolerance, autotune)
    (2, 4, 1000, 64, 64, 128, torch.float32, 1e-4, False),
    (1, 2, 777, 128, 128, 96, torch.float32, 1e-4, False),
    (2, 4, 1024, 64, 64, 128, torch.bfloat16, 5e-2, False),
    (1, 2, 2047, 128, 256, 512, torch.bfloat16, 5e-2, True),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="GPU path runs compiled kernels")
@pytest.mark.parametrize("backward", ["constant", "exact"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_matches_fp32_reference(case, backward, monkeypatch):
    from xlstm_megatron.ops.mlstm import mlstm_chunkwise
    from xlstm_megatron.ops.mlstm.triton import launch, mlstm_chunkwise_triton

    B, NH, S, chunk, DQK, DV, dtype, tol, autotune = case
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "1" if autotune else "0")
    g = torch.Generator(device="cuda").manual_seed(S)
    shapes = [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S)]
    seq = [torch.randn(s, generator=g, device="cuda") for s in shapes]
    seq[:3] = [t.to(dtype).float() for t in seq[:3]]  # the reference sees the same q, k, v
    seq[4] += 3.0
    state = [torch.randn(s, generator=g, device="cuda") for s in ((B, NH, DQK, DV), (B, NH, DQK), (B, NH))]
    dh = torch.randn(B, NH, S, DV, generator=g, device="cuda")
    dC = torch.randn(B, NH, DQK, DV, generator=g, device="cuda")
    outs = {}
    for impl, dt in (("triton", dtype), ("torch", torch.float32)):
        ins = [t.to(dt if j < 3 else torch.float32).clone().requires_grad_() for j, t in enumerate(seq)]
        st = [t.clone().requires_grad_() for t in state]
        fn = mlstm_chunkwise_triton if impl == "triton" else mlstm_chunkwise
        h, (C, n, m) = fn(*ins, chunk_size=chunk, initial_state=tuple(st), return_final_state=True, backward=backward)
        ((h.float() * dh).sum() + (C * dC).sum()).backward()
        outs[impl] = [h, C, n, m] + [t.grad for t in ins + st[:2]]
    names = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0"]
    for name, got, ref in zip(names, outs["triton"], outs["torch"], strict=True):
        if ref is None:
            assert got is None, name
            continue
        assert torch.isfinite(got).all(), name
        err = (got.float() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must run under the Triton interpreter"
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    print(json.dumps(_worker(json.loads(sys.stdin.read()))))

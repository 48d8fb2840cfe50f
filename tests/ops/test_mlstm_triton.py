"""Triton chunkwise mLSTM against the torch chunkwise reference.

- CPU: every case runs under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so one
  worker subprocess runs all cases and reports max errors as JSON; this process never imports the kernels).
- CPU: the kernels compile ahead of time for sm_90 (catches what the interpreter accepts but the compiler does
  not), in a subprocess without the interpreter.
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

from tests.ops.triton_interpreter import (
    assert_compiles_ahead_of_time,
    assert_guarded_without_triton,
    raised_types,
    run_worker_in_interpreter,
)

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
}
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
            err = (got.float() - ref.float()).abs().max().item()
            res[key] = err / max(1.0, ref.abs().max().item())
            if key == "h":  # relative to the output's own scale too (tiny gates make h tiny)
                res["h_rel"] = err / max(1e-30, ref.abs().max().item())
        results[name] = res
    results["validation"] = _validation_errors(mlstm_chunkwise_triton)
    results["saved_bytes"] = {str(r): _saved_bytes(mlstm_chunkwise_triton, r) for r in (True, False)}
    return results


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
    }
    return raised_types(bad)


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_worker_in_interpreter(__file__, CASES, timeout=900)


def test_interpreter_rejects_bad_inputs(interpreter_results):
    assert interpreter_results["validation"] == {
        "fp64": "TypeError", "mixed_dtypes": "TypeError", "shapes": "ValueError", "chunk_size": "ValueError",
        "backward": "ValueError",
    }


def test_package_imports_without_triton_and_stays_off_the_torch_path():
    assert_guarded_without_triton("xlstm_megatron.ops.mlstm.triton", "mlstm_chunkwise_triton")


@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_matches_torch_chunkwise(interpreter_results, case):
    """Outputs, final states and the gradients of q, k, v, i, f and the initial state equal the torch chunkwise."""
    res = interpreter_results[case]
    tol = TOL[CASES[case][6]]
    assert "missing" not in res.values(), res
    bad = {k: v for k, v in res.items() if v is not None and not v <= tol}  # `not <=` also catches nan
    assert not bad, f"errors above {tol}: {bad}"
    expected = {"h", "C", "n", "m", "dq", "dk", "dv", "di", "df"}
    assert expected <= {k for k, v in res.items() if v is not None}


def test_recomputing_the_chunk_states_saves_them(interpreter_results):
    """With recompute_states, backward keeps the initial C, n instead of the fp32 C, n before every chunk."""
    B, NH, S, chunk, DQK, DV = SAVED_SHAPE
    chunks = -(-S // chunk)
    state_bytes = B * NH * (DQK * DV + DQK) * 4
    saved = interpreter_results["saved_bytes"]
    assert saved["False"] - saved["True"] == (chunks - 1) * state_bytes


AOT_SCRIPT = r"""
import sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xlstm_megatron.ops.mlstm.triton import kernels_backward as kb, kernels_forward as kf

TENSORS = {"q_ptr", "k_ptr", "v_ptr", "h_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "dh_ptr"}
flags = {"HAS_DCF": True, "HAS_DNF": True, "HAS_DDEN": True, "HAS_N": True}
kernels = [kf.mlstm_fwd_states_kernel, kf.mlstm_fwd_out_kernel, kb.mlstm_bwd_states_kernel, kb.mlstm_bwd_dq_kernel,
           kb.mlstm_bwd_dk_kernel, kb.mlstm_bwd_dv_kernel]
for arch in (90,):
    for fn in kernels:
        ce = dict(L=128, DQK=96, DV=160, BL=64, BK=64, BV=64, DT=tl.bfloat16, IEEE=False)
        ce.update({k: v for k, v in flags.items() if k in fn.arg_names})
        sig = {a: "constexpr" if a in ce else ("*bf16" if a in TENSORS else "*fp32") if a.endswith("_ptr")
               else "i32" if a in ("S", "NC") else "fp32" for a in fn.arg_names}
        triton.compile(ASTSource(fn, sig, constexprs=ce), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=4, num_stages=2))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_gpu_targets():
    """Ahead-of-time compilation to sm_90 cubins (needs only ptxas, shipped with triton); bf16 operands."""
    assert_compiles_ahead_of_time(AOT_SCRIPT)


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

"""Fused Triton sLSTM against the torch sLSTM (`slstm`, itself tested against the per-step reference).

- CPU: every case runs under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so one
  worker subprocess runs all cases and reports max errors as JSON; this process never imports the kernels): head
  sizes up to the paper's 192, in the "loop" mode (one program per head) and the "steps" mode (a head's columns
  split over programs, one launch per step; the "sync" mode runs the same code with a grid barrier, which the
  interpreter cannot run: it is compiled in test_kernel_resources.py and run by the GPU tests).
- GPU (skipped without CUDA): fp32 / bf16 inputs vs the torch path on the GPU, at realistic sizes, in every mode.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.ops.triton_interpreter import assert_guarded_without_triton, raised_types, run_worker_in_interpreter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

REPO = Path(__file__).resolve().parents[2]

# name: (B, S, NH, DH, dtype, forget_gate, initial state, kind of inputs, mode)
# kinds: "random"; "ties": exp forget gate with ĩ = f̃ = 0 and R_i = R_f = 0, so ĩ == m + log f at every step (the
# max ties) and x == 0 at the min(., 1) clip; "partial_zero_n": a state with n == 0 (and c == 0) on some elements only.
# modes (launch.forced_mode): None (automatic: "loop" under the interpreter) or "steps". Column blocks are 16 wide and
# the reduction runs in 32-wide tiles, so DH 40 / 64 / 128 / 192 have several of each (ragged at 40).
CASES = {
    "sigmoid_zero_state": (2, 12, 2, 16, "float32", "sigmoid", False, "random", None),
    "sigmoid_state": (1, 9, 2, 8, "float32", "sigmoid", True, "random", None),
    "exp_zero_state": (1, 7, 2, 16, "float32", "exp", False, "random", None),
    "exp_state": (2, 10, 2, 8, "float32", "exp", True, "random", None),
    "one_step_state": (2, 1, 2, 8, "float32", "sigmoid", True, "random", None),
    "one_step": (1, 1, 2, 16, "float32", "exp", False, "random", None),
    "padded_head": (2, 6, 2, 12, "float32", "sigmoid", True, "random", None),
    "two_batch_tiles": (17, 3, 2, 8, "float32", "sigmoid", True, "random", None),
    "ties": (2, 5, 2, 8, "float32", "exp", False, "ties", None),
    "partial_zero_n": (2, 6, 2, 8, "float32", "sigmoid", True, "partial_zero_n", None),
    "fp16": (2, 8, 2, 16, "float16", "sigmoid", True, "random", None),
    "bf16": (1, 6, 2, 16, "bfloat16", "exp", True, "random", None),
    "empty_sequence": (2, 0, 2, 8, "float32", "sigmoid", True, "random", None),
    "head_64_split": (2, 4, 1, 64, "float32", "sigmoid", True, "random", "steps"),
    "head_128": (1, 3, 1, 128, "float32", "exp", True, "random", None),
    "ragged_head_40_split": (17, 2, 1, 40, "float32", "sigmoid", True, "partial_zero_n", "steps"),
    "paper_head_192": (1, 3, 1, 192, "float32", "sigmoid", False, "random", None),
    "paper_head_192_split": (1, 3, 1, 192, "float32", "sigmoid", True, "random", "steps"),
    "paper_head_192_bf16_split": (1, 2, 1, 192, "bfloat16", "exp", True, "random", "steps"),
}
# max |triton - torch| / max(1, max |torch|); fp32 math on both sides (fp16 / bf16 only round the inputs and y)
TOL = {"float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
TOL_LOW = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}  # y and dwx come back in the input dtype
NAMES = ["y", "y_last", "c_last", "n_last", "m_last", "dwx", "dr", "db", "dy0", "dc0", "dn0", "dm0"]


def _inputs(case: tuple, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(wx, r, b), the initial state (empty for zeros) and loss weights for y and the final state."""
    B, S, NH, DH, dtype, _, with_state, kind, _ = case
    g = torch.Generator().manual_seed(seed)
    wx = torch.randn(B, S, NH, 4, DH, generator=g).to(getattr(torch, dtype))
    r = torch.randn(NH, DH, 4, DH, generator=g) / DH**0.5
    b = torch.randn(NH, 4, DH, generator=g)
    if kind == "ties":
        wx[:, :, :, :2] = 0.0
        r[:, :, :2] = 0.0
        b[:, :2] = 0.0
    state = []
    if with_state:
        y0, c0, n0, m0 = (torch.randn(B, NH, DH, generator=g) for _ in range(4))
        n0 = n0.abs() + 0.1
        if kind == "partial_zero_n":
            zero = torch.rand(B, NH, DH, generator=g) < 0.5
            n0, c0 = n0.masked_fill(zero, 0.0), c0.masked_fill(zero, 0.0)
        state = [y0, c0, n0, m0]
    weights = [torch.randn(B, S, NH, DH, generator=g)] + [torch.randn(B, NH, DH, generator=g) for _ in range(4)]
    return [wx, r, b], state, weights


def _worker(cases: dict) -> dict:
    """Runs in a subprocess with TRITON_INTERPRET=1: fwd + bwd of every case, triton vs torch."""
    from xlstm_megatron.ops.slstm import slstm
    from xlstm_megatron.ops.slstm.triton import launch, slstm_triton

    results = {}
    for seed, (name, case) in enumerate(cases.items()):
        launch.forced_mode = case[8]
        params, state, weights = _inputs(case, seed)
        outs = {}
        for impl, fn in (("triton", slstm_triton), ("torch", slstm)):
            ins = [t.clone().requires_grad_() for t in params]
            st = [t.clone().requires_grad_() for t in state]
            y, final = fn(*ins, initial_state=tuple(st) or None, forget_gate=case[5])
            loss = sum((o.float() * w).sum() for o, w in zip([y, *final], weights, strict=True))
            loss.backward()
            outs[impl] = [y, *final] + [t.grad for t in ins + st]
        res = {}
        for key, got, ref in zip(NAMES, outs["triton"], outs["torch"], strict=False):
            if got.shape != ref.shape or not torch.isfinite(got).all():
                res[key] = float("nan")
            elif ref.numel() == 0:
                res[key] = 0.0
            else:
                err = (got.float() - ref.float()).abs().max().item() / max(1.0, ref.float().abs().max().item())
                res[key] = err
        res["y_dtype_ok"] = outs["triton"][0].dtype == outs["torch"][0].dtype
        results[name] = res
    launch.forced_mode = None
    results["validation"] = _validation_errors(slstm_triton, launch)
    return results


def _validation_errors(fn, launch) -> dict:
    """Exception type raised for each bad call (None if none was raised)."""
    wx, r, b = torch.randn(1, 2, 2, 4, 8), torch.randn(2, 8, 4, 8), torch.randn(2, 4, 8)
    rows = launch.BATCH_TILE * launch.GRID_YZ_MAX + 1  # one batch tile more than a grid dimension holds
    wide = torch.empty(rows, 0, 1, 4, 8)  # an empty sequence: the size check comes before any allocation

    def sync_in_interpreter():
        launch.forced_mode = "sync"
        try:
            fn(wx, r, b)
        finally:
            launch.forced_mode = None

    bad = {
        "fp64": lambda: fn(wx.double(), r, b),
        "grid_too_large": lambda: fn(wide, r[:1], b[:1]),
        "shapes": lambda: fn(wx, r[:, :4], b),
        "forget_gate": lambda: fn(wx, r, b, forget_gate="tanh"),
        "sync_in_interpreter": sync_in_interpreter,
    }
    return raised_types(bad)


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_worker_in_interpreter(__file__, CASES, timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_matches_torch_slstm(interpreter_results, case):
    """y, the final state and the gradients of wx, r, b (and the initial state) equal the torch sLSTM."""
    res = dict(interpreter_results[case])
    assert res.pop("y_dtype_ok")
    dtype, with_state = CASES[case][4], CASES[case][6]
    expected = set(NAMES) if with_state else set(NAMES[:8])
    assert set(res) == expected
    tol = {k: TOL_LOW[dtype] if k in ("y", "dwx") else TOL[dtype] for k in res}
    bad = {k: v for k, v in res.items() if not v <= tol[k]}  # `not <=` also catches nan
    assert not bad, f"errors above tolerance: {bad}"


def test_interpreter_rejects_bad_inputs(interpreter_results):
    assert interpreter_results["validation"] == {
        "fp64": "TypeError", "grid_too_large": "ValueError", "shapes": "ValueError", "forget_gate": "ValueError",
        "sync_in_interpreter": "ValueError",
    }


def test_package_imports_without_triton_and_stays_off_the_torch_path():
    assert_guarded_without_triton("xlstm_megatron.ops.slstm.triton", "slstm_triton")


GPU_CASES = [  # (B, S, NH, DH, dtype, forget_gate, tolerance, mode)
    (4, 512, 4, 64, torch.float32, "sigmoid", 1e-4, None),
    (33, 200, 2, 40, torch.bfloat16, "sigmoid", 2e-2, None),
    (8, 256, 4, 192, torch.float32, "sigmoid", 1e-4, None),  # xLSTM[7:1] 125M
    (8, 256, 4, 512, torch.bfloat16, "sigmoid", 2e-2, None),  # xLSTM[7:1] 1.3B
    (5, 64, 4, 192, torch.float32, "exp", 1e-4, "loop"),
    (5, 64, 4, 192, torch.float32, "exp", 1e-4, "steps"),
    (5, 64, 4, 192, torch.float32, "exp", 1e-4, "sync"),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="GPU path runs compiled kernels")
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_matches_torch_slstm(case, monkeypatch):
    from xlstm_megatron.ops.slstm import slstm
    from xlstm_megatron.ops.slstm.triton import launch, slstm_triton

    B, S, NH, DH, dtype, forget_gate, tol, mode = case
    monkeypatch.setattr(launch, "forced_mode", mode)
    plans = []
    run = launch.run
    monkeypatch.setattr(launch, "run", lambda *a, **k: plans.append(run(*a, **k)) or plans[-1])
    params, state, weights = _inputs((B, S, NH, DH, "float32", forget_gate, True, "random", None), S)
    params[0] = params[0].to(dtype)
    params, state, weights = ([t.cuda() for t in ts] for ts in (params, state, weights))
    outs = {}
    for impl, fn in (("triton", slstm_triton), ("torch", slstm)):
        ins = [t.clone().requires_grad_() for t in params]
        st = [t.clone().requires_grad_() for t in state]
        y, final = fn(*ins, initial_state=tuple(st), forget_gate=forget_gate)
        sum((o.float() * w).sum() for o, w in zip([y, *final], weights, strict=True)).backward()
        outs[impl] = [y, *final] + [t.grad for t in ins + st]
    for name, got, ref in zip(NAMES, outs["triton"], outs["torch"], strict=True):
        assert torch.isfinite(got).all(), name
        err = (got.float() - ref.float()).abs().max().item() / max(1.0, ref.float().abs().max().item())
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
    assert len(plans) == 2  # forward and backward
    if mode is not None:
        assert {p.mode for p in plans} == {mode}
    elif DH >= 192:  # the paper heads: split over programs with a grid barrier, which fit at these batch sizes
        assert {p.mode for p in plans} == {"sync"} and min(p.programs for p in plans) >= 2


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must run under the Triton interpreter"
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    print(json.dumps(_worker(json.loads(sys.stdin.read()))))

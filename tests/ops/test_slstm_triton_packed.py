"""Fused Triton sLSTM with packed documents (`doc_starts`) against the torch sLSTM with the same starts, in fp64.

The torch form (`slstm`) is itself checked against per-document runs in test_packed_docs.py, so equality here means
each document of a packed row restarts from the zero state in the kernels too. Every case runs in one worker
subprocess under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported; see
test_slstm_triton.py), fp32 and fp16 only (the interpreter's bf16 `tl.dot` is not exact).

Layouts mix several documents per row, one-token documents (also the last token), a start at position 0 with an
initial state (whose gradient must then be exactly 0), a row without any start and a row where every token starts a
document. For fp32 inputs the torch side runs in fp64: at +-30 exp-gate pre-activations the stabiliser m grows by ~30
per step and the fp32 torch path's own rounding reaches 1e-5 (the kernels stay nearer fp64 than that). fp16 is
compared with the torch path at fp16, which rounds wx, y and so dL/dy (the backward's input) alike.
Head size 40 covers the tiled R (several 16-wide column blocks and 32-wide reduction tiles, both ragged),
in one program ("loop") and split over programs ("steps"); 17 rows cover two batch tiles.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.ops.triton_interpreter import raised_types, run_worker_in_interpreter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

REPO = Path(__file__).resolve().parents[2]

# Document starts per row (positions), for S = 12; "random" draws each (row, step) with probability 0.3.
LAYOUTS: dict[str, list[list[int]]] = {
    # start at 0 (drops the initial state), one-token documents at 3 and 11; a row without starts; one at 1 and 2
    "mixed": [[0, 3, 4, 11], [], [1, 2, 7]],
    "every_token": [list(range(12)), [5, 6]],
    "two_rows": [[0, 5], [3, 4, 11]],
}

# name: (B, S, NH, DH, dtype, forget_gate, initial state, layout, kind, mode); kinds: "random", "extreme" (every
# gate pre-activation about +-30), "zero_unmarked" (n0 = c0 = 0 in the rows not starting at 0: the official all(n == 0)
# first-step branch holds, since rows restarting at 0 count as n = 0); modes: launch.forced_mode (None: "loop" under
# the interpreter, or "steps").
CASES = {
    "sigmoid_state": (3, 12, 2, 8, "float32", "sigmoid", True, "mixed", "random", None),
    "exp_zero_state": (3, 12, 2, 8, "float32", "exp", False, "mixed", "random", None),
    "first_step_branch": (3, 12, 1, 8, "float32", "sigmoid", True, "mixed", "zero_unmarked", None),
    "every_token": (2, 12, 1, 8, "float32", "sigmoid", True, "every_token", "random", None),
    "two_batch_tiles": (17, 8, 1, 8, "float32", "exp", True, "random", "random", None),
    "long_random": (2, 24, 1, 16, "float32", "sigmoid", True, "random", "random", None),
    "head_40_loop": (2, 12, 1, 40, "float32", "exp", True, "two_rows", "random", None),
    "head_40_split": (2, 12, 1, 40, "float32", "sigmoid", True, "two_rows", "random", "steps"),
    "fp16": (3, 12, 2, 16, "float16", "sigmoid", True, "mixed", "random", None),
    "extreme_sigmoid": (3, 12, 1, 8, "float32", "sigmoid", True, "mixed", "extreme", None),
    "extreme_exp_split": (2, 12, 1, 40, "float32", "exp", True, "two_rows", "extreme", "steps"),
}
# max |triton - torch| / max(1, max |torch|): the kernels' fp32 math (torch in fp64; fp16 rounds wx, y, dL/dy)
TOL = 1e-5
TOL_LOW = {"float32": 1e-5, "float16": 1e-3}  # y and dwx come back in the input dtype
NAMES = ["y", "y_last", "c_last", "n_last", "m_last", "dwx", "dr", "db", "dy0", "dc0", "dn0", "dm0"]


def _doc_starts(case: tuple, seed: int) -> torch.Tensor:
    B, S, layout = case[0], case[1], case[7]
    if layout == "random":
        return torch.rand(B, S, generator=torch.Generator().manual_seed(seed)) < 0.3
    starts = torch.zeros(B, S, dtype=torch.bool)
    for row, positions in enumerate(LAYOUTS[layout]):
        starts[row, [p for p in positions if p < S]] = True
    return starts


def _inputs(case: tuple, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(wx, r, b), the initial state (empty for zeros) and loss weights for y and the final state."""
    starts = _doc_starts(case, seed)
    B, S, NH, DH, dtype, _, with_state, _, kind, _ = case
    g = torch.Generator().manual_seed(seed)
    wx = torch.randn(B, S, NH, 4, DH, generator=g)
    r = torch.randn(NH, DH, 4, DH, generator=g) / DH**0.5
    b = torch.randn(NH, 4, DH, generator=g)
    if kind == "extreme":  # |y| <= 1, so y R moves the +-30 by about a unit at most
        wx, b = 30.0 * wx.sign(), torch.zeros_like(b)
    state = []
    if with_state:
        y0, c0, n0, m0 = (torch.randn(B, NH, DH, generator=g) for _ in range(4))
        n0 = n0.abs() + 0.1
        if kind == "zero_unmarked":
            keep = starts[:, 0, None, None]
            c0, n0 = c0 * keep, n0 * keep
        state = [y0, c0, n0, m0]
    weights = [torch.randn(B, S, NH, DH, generator=g)] + [torch.randn(B, NH, DH, generator=g) for _ in range(4)]
    return [wx.to(getattr(torch, dtype)), r, b], state, weights


def _run(fn, params, state, weights, **kwargs) -> list[torch.Tensor]:
    """y, the final state and the gradients of a weighted sum of them w.r.t. wx, r, b (and the initial state)."""
    ins = [t.clone().requires_grad_() for t in params]
    st = [t.clone().requires_grad_() for t in state]
    y, final = fn(*ins, initial_state=tuple(st) or None, **kwargs)
    sum((o.to(w.dtype) * w).sum() for o, w in zip([y, *final], weights, strict=True)).backward()
    return [y, *final] + [t.grad for t in ins + st]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return float("nan")
    return (got.float() - ref.float()).abs().max().item() / max(1.0, ref.float().abs().max().item())


def _worker(cases: dict) -> dict:
    """Runs in a subprocess with TRITON_INTERPRET=1: fwd + bwd of every case, triton vs torch, and the extra checks."""
    from xlstm_megatron.ops.slstm import slstm
    from xlstm_megatron.ops.slstm.triton import launch, slstm_triton

    results = {}
    for seed, (name, case) in enumerate(cases.items()):
        launch.forced_mode = case[9]
        params, state, weights = _inputs(case, seed)
        starts = _doc_starts(case, seed)
        kw = {"forget_gate": case[5], "doc_starts": starts}
        got = _run(slstm_triton, params, state, weights, **kw)
        if case[4] == "float32":
            ref = _run(slstm, *([t.double() for t in ts] for ts in (params, state, weights)), **kw)
        else:
            ref = _run(slstm, params, state, weights, **kw)
        res = {key: _rel_err(a, b) for key, a, b in zip(NAMES, got, ref, strict=False)}
        res["finite"] = all(bool(torch.isfinite(t).all()) for t in got)
        if state:  # rows starting a document at 0 drop the initial state: exactly no gradient reaches it
            res["dstate0_at_start"] = max(t[starts[:, 0]].abs().max().item() if starts[:, 0].any() else 0.0
                                          for t in got[-4:])
        res["starts_at_0"] = int(starts[:, 0].sum())
        results[name] = res
    launch.forced_mode = None
    results["checks"] = _checks(slstm_triton, CASES["sigmoid_state"])
    return results


def _checks(fn, case: tuple) -> dict:
    """No-start marks equal None exactly (the DOCS variant changes nothing else); a packed sequence split in two with
    the state carried equals one pass; bad `doc_starts` are refused."""
    params, state, weights = _inputs(case, 0)
    starts = _doc_starts(case, 0)
    none = _run(fn, params, state, weights)
    unmarked = _run(fn, params, state, weights, doc_starts=torch.zeros_like(starts))
    whole_y, whole_state = fn(*params, initial_state=tuple(state), doc_starts=starts)
    split = 5  # between the starts at 4 and 7, inside documents
    y_a, st_a = fn(params[0][:, :split], *params[1:], initial_state=tuple(state), doc_starts=starts[:, :split])
    y_b, st_b = fn(params[0][:, split:], *params[1:], initial_state=st_a, doc_starts=starts[:, split:])
    pieces = [torch.cat([y_a, y_b], dim=1), *st_b]
    wx, r, b = params
    bad = {
        "int_starts": lambda: fn(wx, r, b, doc_starts=starts.int()),
        "short_starts": lambda: fn(wx, r, b, doc_starts=starts[:, :-1]),
    }
    return {
        "unmarked_vs_none": max((a - c).abs().max().item() for a, c in zip(unmarked, none, strict=True)),
        "split_vs_whole": max(_rel_err(a, c) for a, c in zip(pieces, [whole_y, *whole_state], strict=True)),
        "validation": raised_types(bad),
    }


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_worker_in_interpreter(__file__, CASES, timeout=900)


@pytest.mark.parametrize("case", list(CASES))
def test_packed_interpreter_matches_torch_slstm(interpreter_results, case):
    """y, the final state and the gradients of wx, r, b (and the initial state) equal the torch sLSTM with the same
    doc_starts; all finite, also at +-30 gate pre-activations."""
    res = dict(interpreter_results[case])
    assert res.pop("finite")
    dtype, with_state = CASES[case][4], CASES[case][6]
    if with_state and CASES[case][7] != "random":  # every fixed layout marks position 0 in some row
        assert res["starts_at_0"] > 0
    if with_state:
        assert res.pop("dstate0_at_start") == 0.0
    res.pop("starts_at_0")
    assert set(res) == (set(NAMES) if with_state else set(NAMES[:8]))
    tol = {k: TOL_LOW[dtype] if k in ("y", "dwx") else TOL for k in res}
    bad = {k: v for k, v in res.items() if not v <= tol[k]}  # `not <=` also catches nan
    assert not bad, f"errors above tolerance: {bad}"


def test_packed_without_marks_equals_none(interpreter_results):
    assert interpreter_results["checks"]["unmarked_vs_none"] == 0.0


def test_packed_split_sequence_carries_state(interpreter_results):
    assert interpreter_results["checks"]["split_vs_whole"] <= TOL


def test_packed_rejects_bad_doc_starts(interpreter_results):
    assert interpreter_results["checks"]["validation"] == {"int_starts": "ValueError", "short_starts": "ValueError"}


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must run under the Triton interpreter"
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    print(json.dumps(_worker(json.loads(sys.stdin.read()))))

"""Triton chunkwise mLSTM with packed documents (`doc_starts`) against the torch chunkwise with the same starts.

Every case runs under the Triton interpreter in one worker subprocess (TRITON_INTERPRET=1 must be set before triton is
imported; see test_mlstm_triton.py), which reports max errors as JSON: h, the final C, n, m and the gradients of q, k,
v, i, f and of the initial state, for both backward semantics. Layouts hold one-token documents, starts on chunk
boundaries, consecutive starts, a start at position 0 with an initial state (which then gets exactly zero gradient) and
rows without any start; gates at +-30 must stay finite.
"""

import importlib.util
import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.ops.triton_interpreter import raised_types, run_worker_in_interpreter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

REPO = Path(__file__).resolve().parents[2]

# document starts per row (the row count is B); with chunk 8: 8 and 16 are chunk boundaries, 3, 13 and 23 one-token
# documents, 13 / 14 consecutive starts, row 1 drops its initial state (start at 0), row 2 has no start at all
MIXED = [[3, 4, 8, 13, 14, 23], [0, 16, 17], []]
# S = 29 (a padded tail chunk): 16 a chunk boundary for chunk 8 and 16, 28 the last token, 15 a chunk's last token
RAGGED = [[1, 16, 28], [0, 5, 6, 7], [15]]
# every token its own document; starts on every chunk boundary; none
EXTREME = [list(range(16)), [0, 5, 8, 9], []]

# name: S, chunk, DQK, DV, dtype, backward, layout, options. Options: "recompute" (default True), "segment_chunks"
# (forward scan / readout in segments of that many chunks), "gates" ("extreme": i, f = +-30; "alternating": input
# gates shifted by +16 in every other document, whose large stabiliser must not carry over into the next one: h sees
# the stabiliser through eps, as eps * exp(m) in unstabilised units; q, k, n0 >= 0 keep q.n away from 0, which the
# floor exp(-m) no longer does at such gates), "against_none" (an all-false doc_starts against doc_starts=None, both
# Triton)
CASES = {
    "constant": (24, 8, 16, 16, "float32", "constant", MIXED, {}),
    "exact": (24, 8, 16, 16, "float32", "exact", MIXED, {}),
    "ragged_exact_saved_states": (29, 16, 12, 16, "float32", "exact", RAGGED, {"recompute": False}),
    "ragged_constant_segments": (29, 8, 16, 12, "float32", "constant", RAGGED, {"segment_chunks": 1}),
    "fp16_constant": (24, 8, 16, 16, "float16", "constant", MIXED, {}),
    "extreme_constant": (16, 8, 16, 16, "float32", "constant", EXTREME, {"gates": "extreme"}),
    "extreme_exact": (16, 8, 16, 16, "float32", "exact", EXTREME, {"gates": "extreme"}),
    "stabiliser_reset": (24, 8, 16, 16, "float32", "exact", MIXED, {"gates": "alternating"}),
    "no_starts_as_none": (24, 8, 16, 16, "float32", "exact", [[], []], {"against_none": True}),
}
# max |triton - reference| / max(1, max |reference|), per dtype (as test_mlstm_triton.py)
TOL = {"float32": 2e-5, "float16": 5e-3}
KEYS = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"]


def _doc_starts(layout: list[list[int]], S: int) -> torch.Tensor:
    starts = torch.zeros(len(layout), S, dtype=torch.bool)
    for row, positions in enumerate(layout):
        starts[row, positions] = True
    return starts


def _run_case(name: str, case: list, reference, triton_fn) -> dict:
    from xlstm_megatron.ops.mlstm.triton import function

    S, chunk, DQK, DV, dtype, backward, layout, opts = case
    B, NH = len(layout), 2
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    shapes = [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S)]
    seq = [torch.randn(s, generator=g) for s in shapes]
    seq[:3] = [t.to(getattr(torch, dtype)).float() for t in seq[:3]]  # the reference sees the same q, k, v
    starts = _doc_starts(layout, S)
    if opts.get("gates") == "extreme":
        seq[3:] = [30.0 * torch.randint(0, 2, (B, NH, S), generator=g).float().mul(2).sub(1) for _ in range(2)]
    else:
        seq[4] += 1.0
    state = [torch.randn(s, generator=g) for s in ((B, NH, DQK, DV), (B, NH, DQK), (B, NH))]
    if opts.get("gates") == "alternating":
        seq[3] += 16.0 * (starts.cumsum(-1) % 2 == 0)[:, None]
        seq[0], seq[1], state[1] = seq[0].abs(), seq[1].abs(), state[1].abs()
    weights = [torch.randn(s, generator=g) for s in ((B, NH, S, DV), (B, NH, DQK, DV), (B, NH, DQK), (B, NH))]

    tri = partial(triton_fn, recompute_states=opts.get("recompute", True))
    if opts.get("against_none"):
        runs = (("triton", tri, starts), ("reference", tri, None))
    else:
        runs = (("triton", tri, starts), ("reference", reference, starts))
    segment_chunks = function.segment_chunks
    if "segment_chunks" in opts:
        function.segment_chunks = lambda *a: opts["segment_chunks"]
    outs = {}
    try:
        for impl, fn, doc_starts in runs:
            dt = getattr(torch, dtype) if impl == "triton" else torch.float32
            ins = [t.to(dt if j < 3 else torch.float32).clone().requires_grad_() for j, t in enumerate(seq)]
            st = [t.clone().requires_grad_() for t in state]
            h, (C, n, m) = fn(*ins, chunk_size=chunk, initial_state=tuple(st), return_final_state=True,
                              backward=backward, doc_starts=doc_starts)
            loss = (h.float() * weights[0]).sum() + (C * weights[1]).sum() + (n * weights[2]).sum()
            if backward == "exact":
                loss = loss + (m * weights[3]).sum()
            loss.backward()
            outs[impl] = dict(zip(KEYS, [h, C, n, m] + [t.grad for t in ins + st], strict=True))
    finally:
        function.segment_chunks = segment_chunks

    res: dict = {"errors": {}}
    for key, ref in outs["reference"].items():
        got = outs["triton"][key]
        if ref is None or got is None:
            res["errors"][key] = None if ref is None and got is None else "missing"
            continue
        err = (got.float() - ref.float()).abs().max().item()
        res["errors"][key] = err / max(1.0, ref.abs().max().item())
    res["finite"] = all(torch.isfinite(t).all().item() for t in outs["triton"].values() if t is not None)
    # rows whose position 0 is marked drop the initial state: its gradients there must be exactly 0
    dropped = starts[:, 0]
    state_grads = [outs["triton"][key] for key in ("dC0", "dn0", "dm0") if outs["triton"][key] is not None]
    res["dropped_state_grad"] = max(t[dropped].abs().max().item() for t in state_grads) if dropped.any() else None
    res["kept_state_grad"] = max(t[~dropped].abs().max().item() for t in state_grads) if (~dropped).any() else None
    # a start token's forget gate multiplies the empty state (the exact semantics adds a stabiliser term)
    res["df_at_starts"] = outs["triton"]["df"].transpose(0, 1)[:, starts].abs().max().item() if starts.any() else None
    return res


def _validation_errors(fn) -> dict:
    q, g = torch.randn(2, 1, 8, 16), torch.randn(2, 1, 8)
    bad = {
        "dtype": lambda: fn(q, q, q, g, g, doc_starts=torch.zeros(2, 8, dtype=torch.int64)),
        "shape": lambda: fn(q, q, q, g, g, doc_starts=torch.zeros(2, 7, dtype=torch.bool)),
        "batch": lambda: fn(q, q, q, g, g, doc_starts=torch.zeros(1, 8, dtype=torch.bool)),
    }
    return raised_types(bad)


def _worker(cases: dict) -> dict:
    """Runs in a subprocess with TRITON_INTERPRET=1."""
    from xlstm_megatron.ops.mlstm import mlstm_chunkwise
    from xlstm_megatron.ops.mlstm.triton import mlstm_chunkwise_triton

    results = {name: _run_case(name, case, mlstm_chunkwise, mlstm_chunkwise_triton) for name, case in cases.items()}
    results["validation"] = _validation_errors(mlstm_chunkwise_triton)
    return results


@pytest.fixture(scope="module")
def results() -> dict:
    return run_worker_in_interpreter(__file__, CASES, timeout=900)


@pytest.mark.parametrize("case", list(CASES))
def test_packed_matches_torch_chunkwise(results, case):
    """h, the final state and the gradients of q, k, v, i, f and the initial state equal the torch chunkwise with the
    same doc_starts and backward semantics (no_starts_as_none: an all-false doc_starts equals doc_starts=None)."""
    res = results[case]
    tol = TOL[CASES[case][4]]
    assert res["finite"], res
    assert "missing" not in res["errors"].values(), res
    bad = {k: v for k, v in res["errors"].items() if v is not None and not v <= tol}  # `not <=` also catches nan
    assert not bad, f"errors above {tol}: {bad}"
    expected = {"h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0"}
    if CASES[case][5] == "exact":
        expected.add("dm0")
    assert expected <= {k for k, v in res["errors"].items() if v is not None}


@pytest.mark.parametrize("case", [name for name, case in CASES.items() if any(0 in row for row in case[6])])
def test_initial_state_of_a_row_starting_at_zero_gets_no_gradient(results, case):
    """A start at position 0 drops the initial state: exactly zero gradient there, while other rows get some."""
    res = results[case]
    assert res["dropped_state_grad"] == 0.0
    assert res["kept_state_grad"] > 0.0


@pytest.mark.parametrize("case", [name for name, case in CASES.items() if case[5] == "constant" and any(case[6])])
def test_forget_gate_of_a_start_token_gets_no_gradient(results, case):
    """With the stabilisers held fixed, log f at a start only scales the (empty) state before it: exactly 0."""
    assert results[case]["df_at_starts"] == 0.0


def test_rejects_bad_doc_starts(results):
    assert results["validation"] == {"dtype": "ValueError", "shape": "ValueError", "batch": "ValueError"}


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must run under the Triton interpreter"
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    print(json.dumps(_worker(json.loads(sys.stdin.read()))))

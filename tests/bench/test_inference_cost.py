"""bench/inference_cost.py runs end to end on its micro config: every row measured for both families, decoding (the
xLSTM's recurrent state, the Transformer's Megatron KV cache) equal to a full forward, the xLSTM state constant in
the context length and the KV cache growing with it, and the JSON / CSV / PNG written."""

import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_inference_cost_bench_micro(tmp_path):
    out = tmp_path / "ic.json"
    proc = subprocess.run([sys.executable, "bench/inference_cost.py", "--micro", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["env"]["git_commit"] and result["env"]["versions"]["megatron-core"]
    rows = {(r["family"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(f, S) for f in ("xLSTM", "Transformer") for S in (16, 64)}
    for (_, S), row in rows.items():
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0 and row["state_bytes"] > 0
        if S == 16:
            assert row["decode_max_abs_err_vs_full_forward"] < 1e-4, row
    assert rows[("xLSTM", 16)]["state_bytes"] == rows[("xLSTM", 64)]["state_bytes"]
    assert rows[("Transformer", 64)]["state_bytes"] > 3 * rows[("Transformer", 16)]["state_bytes"]
    assert set(result["ratios"]["Transformer/xLSTM decode_ms_per_token"]) == {"16", "64"}
    with out.with_suffix(".csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

"""`xlstm-megatron study run` skips finished points and resumes half-finished ones from their checkpoints; `study
collect` tabulates them (real runs of the train command, mock data)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

STUDY = """
name: resume
families:
  v1: {xlstm_block: v1, mlstm_chunk_size: 8}
  llama: {model_family: transformer}
sizes:
  - {num_layers: 1, hidden_size: 32, num_attention_heads: 2}
budgets: {tokens: [1024]}
lrs: [3.0e-3]
train: {seq_length: 32, micro_batch_size: 4, global_batch_size: 8, mock_data: true, tokenizer_type: NullTokenizer,
        vocab_size: 256, make_vocab_size_divisible_by: 64, eval_iters: 1, log_interval: 1, lr_warmup_iters: 1}
"""


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xlstm_megatron.cli", *argv], capture_output=True, text=True,
                          timeout=600)


def test_finished_points_are_skipped_and_half_finished_ones_resume(tmp_path):
    study, out = tmp_path / "study.yaml", tmp_path / "out"
    study.write_text(STUDY)
    # prepare the directory only (writes the point configs; --slurm-array stops there)
    proc = _cli("study", "run", str(study), "--out", str(out), "--slurm-array", "--gpus", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sbatch = (out / "study.sbatch").read_text()
    assert "#SBATCH --array=0-1" in sbatch and "study point" in sbatch
    ids = (out / "points.txt").read_text().split()
    assert ids == ["v1-L1-E32-H2-T1.02e03-lr0.003", "llama-L1-E32-H2-T1.02e03-lr0.003"]
    done_dir, half_dir = out / "points" / ids[0], out / "points" / ids[1]
    # point 1 "finished" earlier (a summary at the last iteration); point 2 stopped after iteration 2 of 4
    (done_dir / "summary.json").write_text(json.dumps({"iteration": 4, "history": {"train": [[4, 5.0]],
                                                                                   "valid": [[4, 5.1]]}}))
    stop = _cli("train", "--config", str(half_dir / "point.yaml"), "--exit-interval", "2")
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert (half_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    proc = _cli("study", "run", str(study), "--out", str(out))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "1 of 2 points done already; running 1" in proc.stdout
    assert not (done_dir / "train.log").exists()  # never started again
    log = (half_dir / "train.log").read_text()
    assert "loading distributed checkpoint from" in log and "at iteration 2" in log
    summary = json.loads((half_dir / "summary.json").read_text())
    assert summary["iteration"] == 4 and summary["architecture"].startswith("Transformer baseline: 1 layers")
    assert [it for it, _ in summary["history"]["train"]] == [1, 2, 3, 4]
    attempts = json.loads((half_dir / "point.json").read_text())["attempts"]
    assert [(a["from"], a["status"], a["rc"]) for a in attempts] == [("partial", "done", 0)]

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["point"] for r in rows] == ids and {r["status"] for r in rows} == {"done"}
    assert float(rows[0]["final_valid_loss"]) == 5.1
    half = rows[1]
    assert float(half["final_valid_loss"]) == summary["valid_loss"] and float(half["tokens"]) == 4 * 8 * 32
    assert float(half["flops"]) > 0 and int(half["params_total"]) > 0 and half["config_hash"]
    assert float(half["tokens_per_s"]) > 0 and half["commit"]
    # a third run has nothing to do
    again = _cli("study", "run", str(study), "--out", str(out))
    assert again.returncode == 0 and "2 of 2 points done already; running 0" in again.stdout

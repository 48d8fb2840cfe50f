"""Bad converter input ends with one `error: ...` line, exit status 2, and nothing written next to --out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tests.convert.hf_models import convert, random_hf_model

TINY = dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_heads=2, chunk_size=8)


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of an HF directory (files linked) whose config.json has `changes`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **changes}))
    return dst


def _v1_files(tmp: Path) -> tuple[Path, Path]:
    from xlstm import mLSTMBlockConfig, mLSTMLayerConfig, xLSTMLMModel, xLSTMLMModelConfig

    cfg = {"embedding_dim": 32, "num_blocks": 1, "vocab_size": 16, "mlstm_block": {"mlstm": {"num_heads": 2}}}
    model = xLSTMLMModel(xLSTMLMModelConfig(mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(num_heads=2)),
                                            num_blocks=1, embedding_dim=32, vocab_size=16, context_length=8))
    (tmp / "v1.yaml").write_text(yaml.safe_dump(cfg))
    sd = model.state_dict()
    sd.pop("xlstm_block_stack.blocks.0.xlstm.learnable_skip")
    torch.save(sd, tmp / "v1_missing.pt")
    (tmp / "v1_wide.yaml").write_text(yaml.safe_dump({**cfg, "embedding_dim": 64}))
    torch.save(model.state_dict(), tmp / "v1.pt")
    return tmp / "v1.yaml", tmp / "v1_wide.yaml"


def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path):
    hf = random_hf_model(seed=2, **TINY)
    hf.save_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    shards[1].unlink()
    (tmp_path / "truncated").mkdir()
    for f in (tmp_path / "hf").iterdir():
        (tmp_path / "truncated" / f.name).write_bytes(f.read_bytes()[: 4000 if f.suffix == ".safetensors" else None])
    llama = _edit_config(tmp_path / "hf", tmp_path / "llama", model_type="llama")
    shapes = _edit_config(tmp_path / "hf", tmp_path / "shapes", qk_dim_factor=0.25)
    tied = _edit_config(tmp_path / "hf", tmp_path / "tied", tie_word_embeddings=True)
    v1_cfg, v1_wide = _v1_files(tmp_path)
    (tmp_path / "exists").mkdir()
    out = tmp_path / "out"
    cases = {
        "model_type='llama'": ["hf-to-megatron", "--hf-dir", llama, "--out", out],
        f"names shard {shards[1].name}, which is missing": ["hf-to-megatron", "--hf-dir", tmp_path / "sharded",
                                                            "--out", out],
        "cannot read model.safetensors": ["hf-to-megatron", "--hf-dir", tmp_path / "truncated", "--out", out],
        "has shape (32, 64), the config implies (16, 64)": ["hf-to-megatron", "--hf-dir", shapes, "--out", out],
        "tie_word_embeddings=True": ["hf-to-megatron", "--hf-dir", tied, "--out", out],
        "has no config.json": ["hf-to-megatron", "--hf-dir", tmp_path / "nowhere", "--out", out],
        "already exists": ["hf-to-megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "exists"],
        "has no tensor 'xlstm_block_stack.blocks.0.xlstm.learnable_skip'": [
            "xlstm-v1-to-megatron", "--state-dict", tmp_path / "v1_missing.pt", "--config", v1_cfg, "--out", out],
        "has shape (16, 32), the config implies (16, 64)": [
            "xlstm-v1-to-megatron", "--state-dict", tmp_path / "v1.pt", "--config", v1_wide, "--out", out],
        "has no checkpoint": ["megatron-to-hf", "--ckpt", tmp_path / "hf", "--out", out],
    }
    results = convert(*cases.values())
    for (expected, argv), (rc, err) in zip(cases.items(), results, strict=True):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and expected in lines[0], (argv[0], expected, err[-2000:])
    assert not out.exists()
    assert list((tmp_path / "exists").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial directories


def test_checkpoint_export_refusals(tmp_path):
    """A v1 model has no HF counterpart; missing iterations, a marker naming no checkpoint, a directory that is not a
    checkpoint of ours and a truncated checkpoint file are refused in one line."""
    hf = random_hf_model(seed=3, **TINY)
    hf.save_pretrained(tmp_path / "hf")
    v1_cfg, _ = _v1_files(tmp_path)
    results = convert(["hf-to-megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt"],
                      ["xlstm-v1-to-megatron", "--state-dict", tmp_path / "v1.pt", "--config", v1_cfg,
                       "--out", tmp_path / "v1ckpt"])
    assert all(rc == 0 for rc, _ in results), results
    (tmp_path / "marker").mkdir()
    (tmp_path / "marker" / "latest_checkpointed_iteration.txt").write_text("3")
    (tmp_path / "marker" / "iter_0000003").mkdir()  # a directory, but no checkpoint in it
    (tmp_path / "nomarker").mkdir()
    (tmp_path / "nomarker" / "latest_checkpointed_iteration.txt").write_text("3")
    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "ckpt", truncated)
    for f in (truncated / "iter_0000000").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "out"
    cases = {
        "xLSTM-Large mLSTM stacks only": ["megatron-to-hf", "--ckpt", tmp_path / "v1ckpt", "--out", out],
        "iter_0000005 does not exist": ["megatron-to-hf", "--ckpt", tmp_path / "ckpt", "--iteration", "5",
                                        "--out", out],
        "names '3', which is not a complete checkpoint": ["megatron-to-hf", "--ckpt", tmp_path / "nomarker",
                                                          "--out", out],
        "is incomplete (no metadata.json: its save did not finish)": [
            "megatron-to-hf", "--ckpt", tmp_path / "marker", "--iteration", "3", "--out", out],
        "is truncated": ["megatron-to-hf", "--ckpt", truncated, "--out", out],
    }
    for expected, (rc, err) in zip(cases, convert(*cases.values()), strict=True):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and expected in lines[0], (expected, err[-2000:])
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_command_line_reports_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xlstm_megatron.convert.cli", "hf-to-megatron", "--hf-dir", str(tmp_path / "none"),
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "config.json" in proc.stderr
    assert sum(line.startswith("error:") for line in proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()

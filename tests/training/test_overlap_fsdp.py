"""Communication overlap and fully sharded data parallelism with xLSTM stacks (mLSTM and sLSTM layers mixed), through
`xlstm-megatron train` (Megatron's pretrain) on real gloo ranks:

- `--overlap-grad-reduce --overlap-param-gather` with the distributed optimizer logs exactly the losses of the run
  without overlap (DP=2; PP=2 x DP=2 with checkpoints in the slow test);
- torch FSDP2 (`--use-torch-fsdp2`) trains like DDP, its checkpoint (the mixers' unevenly sharded parameters included,
  see `layers.parallel_utils`) holds the weights of the DDP run's, and a stopped and resumed FSDP2 run equals the
  uninterrupted one bitwise (with the compat fixes in patches/README.md, section 8);
- Megatron-FSDP (`--use-megatron-fsdp`) needs CUDA: skipped here with the reason.

Fresh runs of the same layout start from the same weights, so each comparison is between runs of one layout. Losses
come from Megatron's iteration log (runs without --save) unless a test saves."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.training.engine_runs import BASE, close, model_tensors, train

DISTOPT = ("--use-distributed-optimizer",)
OVERLAP = ("--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather")


def no_checkpoint_train(*flags: str, nproc: int) -> dict[int, float]:
    """Train losses of a run without --save, from Megatron's iteration log lines."""
    cmd = [sys.executable, "-m", "xlstm_megatron.cli", "train", *BASE, "--nproc", str(nproc), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    found = re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)", proc.stdout + proc.stderr)
    return {int(it): float(loss) for it, loss in found}


@pytest.fixture
def fsdp_env(monkeypatch):
    # The train command defaults CUDA_DEVICE_MAX_CONNECTIONS to 1 (what TP overlap wants); Megatron refuses FSDP
    # with 1 (its all-gathers must be able to run beside compute)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")


@pytest.fixture(scope="module")
def dp2():
    """DP=2 with the distributed optimizer, no overlap: the run the others must equal."""
    return no_checkpoint_train(*DISTOPT, nproc=2)


def test_overlap_equals_no_overlap_dp2(dp2):
    run = no_checkpoint_train(*OVERLAP, nproc=2)
    assert run == dp2  # exact floats: the same buckets reduced, only earlier


@pytest.mark.slow
def test_overlap_equals_no_overlap_pp2_dp2(tmp_path):
    pp = ("--pipeline-model-parallel-size", "2")
    plain = train(tmp_path / "plain", *pp, *DISTOPT, nproc=4)
    overlap = train(tmp_path / "overlap", *pp, *OVERLAP, nproc=4)  # and saves its checkpoints with overlap on
    assert overlap == plain


def test_torch_fsdp2_trains_like_ddp(dp2, fsdp_env):
    run = no_checkpoint_train("--use-torch-fsdp2", nproc=2)
    # Megatron logs 7 significant digits; FSDP2 reduce-scatters where DDP all-reduces: equal to round-off
    assert sorted(run) == [1, 2, 3, 4, 5, 6]
    assert close(run, dp2, rtol=1e-6), (run, dp2)


def test_torch_fsdp2_checkpoint_holds_the_ddp_weights_and_resumes_exactly(tmp_path, fsdp_env):
    whole = train(tmp_path / "fsdp2", "--use-torch-fsdp2", nproc=2)
    train(tmp_path / "ddp", nproc=2)
    train(tmp_path / "resumed", "--use-torch-fsdp2", "--exit-interval", "3", nproc=2)
    resumed = train(tmp_path / "resumed", "--use-torch-fsdp2", nproc=2)
    assert resumed == whole  # every logged loss, bitwise
    torch.testing.assert_close(model_tensors(tmp_path / "resumed" / "iter_0000006"),
                               model_tensors(tmp_path / "fsdp2" / "iter_0000006"), rtol=0, atol=0)
    fsdp2, ddp = (model_tensors(tmp_path / run / "iter_0000006") for run in ("fsdp2", "ddp"))
    # FSDP2 keeps the fused in_proj rows as one tensor (its DP pieces cut across the parts); every other entry,
    # the mixers' unevenly sharded gate weights and biases included, has the key and the values of DDP's
    shared = sorted(set(fsdp2) & set(ddp))
    assert {k for k in fsdp2 if k not in ddp} == {k for k in fsdp2 if k.endswith("in_proj.weight")}
    assert any(k.endswith("self_attention.gate_weight") for k in shared)
    for key in shared:
        torch.testing.assert_close(fsdp2[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "Megatron-FSDP needs CUDA: its adapter places buffers on torch.device(f'cuda:{torch.cuda.current_device()}') "
    "(megatron/core/distributed/fsdp/mcore_fsdp_adapter.py) and its parameter/gradient buffers use CUDA streams, "
    "events and the CUDA caching allocator (megatron_fsdp/param_and_grad_buffer.py); no CPU/gloo path exists"))
def test_megatron_fsdp_trains_like_ddp(dp2, fsdp_env):
    run = no_checkpoint_train("--use-megatron-fsdp", "--use-distributed-optimizer", "--ckpt-format", "fsdp_dtensor",
                              nproc=2)
    assert close(run, dp2, rtol=1e-4), (run, dp2)

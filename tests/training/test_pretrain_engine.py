"""`xlstm-megatron train` runs Megatron's own loop (`megatron.training.pretrain`) with xLSTM layers on CPU/gloo, and
every parallel layout trains the same model: from the same starting weights, TP=2 with sequence parallelism, PP=2
(1F1B and interleaved) and DP=2 with the distributed optimizer equal the one-process run; a stopped run resumes
bitwise; a TP2 x PP2 checkpoint continues at TP1 x PP1 with the same losses.

Fresh runs of different layouts start from different weights by design (Megatron offsets the seed by 100 x pipeline
rank), so the layout runs start from one checkpoint (`--load START --finetune`: weights only, resharded)."""

from __future__ import annotations

import pytest

from tests.training.engine_runs import close, model_tensors, short_documents, train


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Weights after one iteration of a one-process run: the common start of the layout runs."""
    root = tmp_path_factory.mktemp("start") / "run"
    train(root, "--exit-interval", "1", "--save-interval", "1")
    return ("--load", str(root), "--finetune")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, start):
    """The one-process run every layout must equal."""
    root = tmp_path_factory.mktemp("ref") / "run"
    return {**train(root, *start), "dir": root}


def test_single_process_run_learns(reference):
    assert sorted(reference["train"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(reference["valid"]) == [3, 6]
    assert reference["train"][6] < reference["train"][1]


def test_megatron_counts_the_xlstm_flops(reference):
    """Megatron's FLOP tally (throughput log, checkpoints) is the xLSTM model's count, not a Transformer's."""
    from xlstm_megatron.models.flops import train_flops_per_token
    from xlstm_megatron.runs.checkpoint import common_state, saved_args
    from xlstm_megatron.runs.model import xlstm_config_from_args

    iter_dir = reference["dir"] / "iter_0000006"
    args = saved_args(iter_dir)
    per_token = train_flops_per_token(xlstm_config_from_args(args), args.padded_vocab_size, args.seq_length)
    # the start checkpoint's iteration plus six (Megatron carries the tally over a --finetune load)
    tokens = 7 * args.global_batch_size * args.seq_length
    assert common_state(iter_dir)["num_floating_point_operations_so_far"] == pytest.approx(per_token * tokens)


@pytest.mark.parametrize(
    "flags",
    [
        ("--tensor-model-parallel-size", "2", "--sequence-parallel"),
        ("--pipeline-model-parallel-size", "2"),
        ("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"),
        ("--use-distributed-optimizer",),
    ],
    ids=["tp2-sp", "pp2-1f1b", "pp2-interleaved", "dp2-distopt"],
)
def test_parallel_layouts_equal_one_process(start, reference, tmp_path, flags):
    run = train(tmp_path / "run", *start, *flags, nproc=2)
    assert close(run["train"], reference["train"]), (run["train"], reference["train"])
    assert close(run["valid"], reference["valid"])


def test_stopped_and_resumed_run_equals_uninterrupted_bitwise(tmp_path):
    flags = ("--use-distributed-optimizer",)
    full = train(tmp_path / "full", *flags, nproc=2)
    first = train(tmp_path / "resumed", *flags, "--exit-interval", "3", nproc=2)
    assert sorted(first["train"]) == [1, 2, 3]
    resumed = train(tmp_path / "resumed", *flags, nproc=2)  # --save is also --load: continues at iteration 4
    assert resumed["train"] == full["train"]  # exact floats, including the iterations before the stop
    assert resumed["valid"] == full["valid"]
    a, b = model_tensors(tmp_path / "full" / "iter_0000006"), model_tensors(tmp_path / "resumed" / "iter_0000006")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
def test_tp2_pp2_checkpoint_continues_at_tp1_pp1(start, reference, tmp_path):
    train(tmp_path / "run", *start, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
          "--exit-interval", "3", nproc=4)
    continued = train(tmp_path / "run", nproc=1)  # its own checkpoint, another layout: dist checkpoints reshard
    assert sorted(continued["train"]) == [1, 2, 3, 4, 5, 6]
    assert close(continued["train"], reference["train"]), (continued["train"], reference["train"])


def test_context_parallel_run_with_packed_documents_equals_one_process(tmp_path):
    """`--context-parallel-size 2` through Megatron's loop (zigzag batch split, state passing between the ranks'
    pieces, gradients reduced over DP x CP) trains the same all-mLSTM model as one process, here with packed
    documents (`--reset-attention-mask` over documents of 2-20 tokens: the mask is broadcast and split over CP).
    Fresh runs: CP does not enter Megatron's seeds, so both start from the same weights. A run without the reset
    trains differently: the resets took effect."""
    data = short_documents(tmp_path / "docs")
    mlstm_only = ("--xlstm-pattern", "mmmm", "--reset-attention-mask", "--split", "90,10,0")
    one = train(tmp_path / "one", *mlstm_only, data=data)
    cp2 = train(tmp_path / "cp2", *mlstm_only, "--context-parallel-size", "2", nproc=2, data=data)
    assert close(cp2["train"], one["train"]), (cp2["train"], one["train"])
    assert close(cp2["valid"], one["valid"])
    unpacked = train(tmp_path / "unpacked", *mlstm_only[:2], *mlstm_only[3:], data=data)
    assert not close(unpacked["train"], one["train"], rtol=1e-3)

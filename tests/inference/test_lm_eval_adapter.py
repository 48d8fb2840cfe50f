"""The lm-evaluation-harness adapter on a tiny Megatron checkpoint (NullTokenizer: text is space-separated ids).

The adapter tests run without lm_eval (requests are plain objects with lm_eval's `.args`); those that need the
package (registry, rolling windows against lm_eval's own, `simple_evaluate` end to end) skip without it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.inference.test_generate_cli import VOCAB, _save_checkpoint
from tests.megatron.dist import run_distributed

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval is not installed (pip install '.[eval]')")

EOD = VOCAB - 1  # NullTokenizer (megatron-core 0.19): VOCAB ids, the last one end-of-document
SEQ_LENGTH = 16  # the checkpoint's --seq-length: the adapter's default window
# A 4-item multiple-choice task; the gold labels do not matter (the model is random): the accuracy is compared with
# the adapter's own choices.
ITEMS = [
    {"context": "1 2 3", "choices": ["4", "9", "17 18"], "label": 0},
    {"context": "5 6", "choices": ["7", "8"], "label": 1},
    {"context": "10 20 30 40", "choices": ["50", "60 70", "1"], "label": 2},
    {"context": "3 3 3", "choices": ["3", "4"], "label": 0},
]


@dataclass
class _Request:  # lm_eval's Instance as the adapter reads it
    args: tuple


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("lm_eval") / "run"
    run_distributed(_save_checkpoint, world_size=1, args=(str(run_dir),), timeout=240)
    return str(run_dir)


def _ids(text: str) -> list[int]:
    return [int(t) for t in text.split()]


def _reference_logprobs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and logits of `ids[1:]` from one unbatched forward of the loaded model over `ids[:-1]`."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), None, None)[0].float()
    target = torch.tensor(ids[1:])
    return F.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0], logits


def _adapter_vs_model(run_dir: str) -> dict:
    from xlstm_megatron.inference import generate, lm_eval_adapter
    from xlstm_megatron.inference.lm_eval_adapter import XLSTMMegatronLM

    lm = XLSTMMegatronLM(run_dir, batch_size=3)
    out: dict = {"max_length": lm.max_length}

    prompts = ["1 2 3", "4"]
    reference = generate(lm.model, [_ids(p) for p in prompts], 24, temperature=0, vocab_limit=VOCAB + 1).tokens
    text = lambda ids: " ".join(map(str, ids))  # noqa: E731

    # loglikelihood: batched and padded against one forward per request; the last pair is the greedy continuation
    pairs = [("1 2 3", " 4"), ("5", " 6 7 8"), ("", "9 10"), ("11 12 13 14 15 16", " 17"), ("2 ", "3"),
             (prompts[0], " " + text(reference[0][:3]))]
    got = lm.loglikelihood([_Request(p) for p in pairs])
    ref = []
    for context, continuation in pairs:
        head = _ids(context) or [EOD]
        ids = head + _ids(continuation)
        logprobs, logits = _reference_logprobs(lm.model, ids)
        n = len(_ids(continuation))
        greedy = bool((logits[-n:].argmax(-1) == torch.tensor(ids[-n:])).all())
        ref.append((logprobs[-n:].sum().item(), greedy))
    out["loglikelihood"] = (got, ref)

    # loglikelihood_rolling: a short document is one forward; a long one (40 tokens, window 16) is lm_eval's
    # windows, written out here: tokens 0-15 from [EOD, 0..14], 16-31 from tokens 15-30, 32-39 from tokens 23-38
    short, long = list(range(1, 11)), list(range(1, 41))
    seq = [EOD, *long]
    long_ref = sum(_reference_logprobs(lm.model, seq[a : b + 1])[0][-(b - c) :].sum().item()
                   for a, b, c in [(0, 16, 0), (16, 32, 16), (24, 40, 32)])
    out["rolling"] = (lm.loglikelihood_rolling([_Request((text(short),)), _Request((text(long),))]),
                      [_reference_logprobs(lm.model, [EOD, *short])[0].sum().item(), long_ref])
    state = XLSTMMegatronLM(run_dir, rolling="state")
    out["rolling_state"] = (state.loglikelihood_rolling([_Request((text(long),))])[0],
                            _reference_logprobs(lm.model, seq)[0].sum().item())

    # generate_until: greedy tokens of `generate` in one call, cut at a stop string; the adapter decodes in rounds
    lm_eval_adapter.FIRST_ROUND = 4  # several rounds (4, 8, 12 tokens) before max_gen_toks
    texts = [text(t) for t in reference]
    stop = " " + text(reference[0][9:11])  # the 10th and 11th tokens of the first prompt
    greedy = {"until": [stop], "max_gen_toks": 24, "do_sample": False}
    out["generate"] = (lm.generate_until([_Request((p, greedy)) for p in prompts]), texts, stop, reference)
    out["generate_short"] = lm.generate_until([_Request(("1 2 3", {"until": [], "max_gen_toks": 5}))])[0]

    # the multiple-choice task's answers by the adapter's own log-likelihoods
    answers = []
    for item in ITEMS:
        scores = lm.loglikelihood([_Request((item["context"], " " + c)) for c in item["choices"]])
        answers.append(max(range(len(scores)), key=lambda i: scores[i][0]) == item["label"])
    out["mc_accuracy"] = sum(answers) / len(answers)
    return out


@pytest.fixture(scope="module")
def adapter_results(checkpoint) -> dict:
    return run_distributed(_adapter_vs_model, world_size=1, args=(checkpoint,), timeout=300)[0]


def test_loglikelihood_equals_the_models_forward(adapter_results):
    got, ref = adapter_results["loglikelihood"]
    for (logprob, greedy), (ref_logprob, ref_greedy) in zip(got, ref, strict=True):
        assert logprob == pytest.approx(ref_logprob, rel=1e-4, abs=1e-4)
        assert greedy == ref_greedy
    assert all(logprob < 0 for logprob, _ in got)
    assert got[-1][1], "the greedy continuation is greedy"


def test_loglikelihood_rolling_sums_over_the_document(adapter_results):
    assert adapter_results["max_length"] == SEQ_LENGTH
    got, ref = adapter_results["rolling"]
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-4)
    state, full = adapter_results["rolling_state"]  # one recurrent pass equals one full forward
    assert state == pytest.approx(full, rel=1e-4, abs=1e-4)
    assert state != pytest.approx(got[1], rel=1e-6)  # the windows really cut the context


def test_generate_until_stops_at_the_stop_string(adapter_results):
    got, texts, stop, reference = adapter_results["generate"]
    assert all(EOD not in tokens for tokens in reference), "the random model ended early; pick other prompts"
    assert got[0] == texts[0][: texts[0].index(stop)] and len(_ids(got[0])) <= 9
    assert got[1] == _cut(texts[1], stop)
    assert adapter_results["generate_short"] == " ".join(texts[0].split()[:5])


def _cut(text: str, stop: str) -> str:
    return text[: text.index(stop)] if stop in text else text


def test_module_imports_without_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import xlstm_megatron.inference.lm_eval_adapter as a, xlstm_megatron.inference.lm_eval_cli as c\n"
            "assert a.register_model is None\n"
            "sys.exit(c.lm_eval_main(['--load', 'nowhere', '--tasks', 'x']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: lm_eval is not installed; pip install 'xlstm-megatron[eval]'"


@needs_lm_eval
def test_bad_checkpoint_fails_in_one_line(tmp_path: Path, capsys):
    from xlstm_megatron.inference.lm_eval_cli import lm_eval_main

    assert lm_eval_main(["--load", str(tmp_path / "x"), "--tasks", "anything"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: --load {tmp_path / 'x'} does not exist; pass the run's --save directory"], err


@needs_lm_eval
def test_registered_and_windows_match_lm_eval():
    from lm_eval.api.registry import get_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from xlstm_megatron.inference.lm_eval_adapter import XLSTMMegatronLM, rolling_windows

    assert get_model("xlstm-megatron") is XLSTMMegatronLM
    for n in (0, 1, 5, 16, 17, 40, 100):
        for window in (1, 4, 16):
            tokens = list(range(n))
            ours = rolling_windows(tokens, -1, window)
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, -1, window, 1)]
            assert ours == theirs, (n, window)


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@needs_lm_eval
def test_simple_evaluate_end_to_end_on_a_local_task(checkpoint, adapter_results, tmp_path: Path):
    data = tmp_path / "tasks" / "tiny_mc.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (data.parent / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp_path / "results.json"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "xlstm_megatron.inference.lm_eval_cli", "--load", checkpoint, "--tasks", "tiny_mc",
         "--include-path", str(data.parent), "--batch-size", "4", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout.strip().splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table]
    assert cells[0] == ["Tasks", "Version", "Filter", "n-shot", "Metric", "Value", "Stderr"], proc.stdout
    assert cells[2][0] == "tiny_mc" and cells[2][4] == "acc", proc.stdout
    results = json.loads(out.read_text())["results"]["tiny_mc"]
    assert results["acc,none"] == pytest.approx(adapter_results["mc_accuracy"])

"""Bad study files fail before any run with one line naming the file and the key (`xlstm-megatron study run`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

GOOD = yaml.safe_load(Path(__file__).with_name("tiny_study.yaml").read_text())


def _with(**changes):
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = doc
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    return doc


CASES = {
    "unknown top key": (_with(budget={"tokens": [1]}), "budget: unknown key; did you mean 'budgets'?"),
    "no families": (_with(families=None), "families: missing"),
    "family not a mapping": (_with(families={"v1": "v1"}, lrs=[1e-3]), "families.v1: must be a mapping"),
    "bad ratio": (_with(families={"v1": {"xlstm_ratio": "7-1"}}, lrs=[1e-3]), "families.v1.xlstm_ratio"),
    "size neither shape nor params": (_with(sizes=[{"num_layers": 2}]), "sizes[0]"),
    "negative params": (_with(sizes=[{"params": -5}]), "sizes[0].params: -5 must be a positive number"),
    "two budget kinds": (_with(budgets={"tokens": [1], "flops": [1]}), "budgets: must be"),
    "lr for unknown family": (_with(lrs={"v1": [1e-3], "v1_3_1": [1e-3], "llama": [1e-3], "gpt": [1]}),
                              "lrs: names families ['gpt']"),
    "per-point key in train": (_with(train__lr=1e-3), "train.lr: is set per point by the study"),
    "unknown run flag": (_with(train__hiden_size_x=3), "did you mean"),
    "flag in family and train": (_with(families={"v1": {"seq_length": 64}}, lrs=[1e-3]),
                                 "families.v1.seq_length: is also in"),
    "xLSTM flag on the baseline": (_with(families={"llama": {"model_family": "transformer", "xlstm_pattern": "mm"}},
                                         lrs=[1e-3]), "--xlstm-pattern is an xLSTM flag"),
    "unknown shape key": (_with(shape={"aspekt": 3}), "shape.aspekt: unknown key; did you mean 'aspect'?"),
    "target beyond max depth": (_with(sizes=[{"params": 1e12}]), "raise max_layers or aspect"),
    "not yaml": ("families: [", "not valid YAML"),
}


@pytest.mark.parametrize("doc,expected", CASES.values(), ids=CASES.keys())
def test_bad_study_file_gives_one_line(tmp_path, capsys, doc, expected):
    from xlstm_megatron.cli import main

    path = tmp_path / "study.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    assert main(["study", "run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and expected in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_study_file(tmp_path, capsys):
    from xlstm_megatron.cli import main

    assert main(["study", "run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: study file {str(tmp_path / 'nope.yaml')!r} does not exist"

"""Study grids: one run config per (family, size, budget, lr), target parameter counts solved for depth and width,
config hashes, and a study directory that refuses points run with other flags."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from xlstm_megatron.runs.errors import ConfigError
from xlstm_megatron.studies.grid import (
    Counter,
    config_hash,
    load_study,
    materialise,
    ratio_pattern,
    shape_for_layers,
)

STUDY = Path(__file__).with_name("tiny_study.yaml")


@pytest.fixture(scope="module")
def grid():
    from xlstm_megatron.training.command import add_runner_args

    study = load_study(STUDY)
    counter = Counter(study, add_runner_args)
    return study, counter, materialise(study, add_runner_args, counter)


def test_grid_has_one_point_per_family_size_budget_lr(grid):
    study, _, points = grid
    assert len(points) == (1 + 1 + 2) * 2 * 2  # lrs per family (1, 1, 2) x sizes x budgets
    assert len({p.id for p in points}) == len(points) and len({p.config_hash for p in points}) == len(points)
    by_id = {p.id: p for p in points}
    p = by_id["llama-L2-E32-H2-T1e03-lr0.001"]
    assert p.train["train_iters"] == math.ceil(1000 / (8 * 32)) == 4
    assert p.tokens == 4 * 8 * 32
    assert (p.train["lr"], p.train["min_lr"], p.train["eval_interval"], p.train["save_interval"]) == (1e-3, 1e-4, 4, 2)
    assert p.model == {"model_family": "transformer", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2}
    assert p.flops == p.train_flops_per_token * p.tokens
    mix = by_id["v1_3_1-L2-E32-H2-T2.05e03-lr0.003"]
    assert mix.model["xlstm_pattern"] == "ms" and mix.train["train_iters"] == 8


def test_target_parameter_counts_are_solved_to_the_nearest_aspect_rule_shape(grid):
    study, counter, points = grid
    for family in study.families:
        p = next(q for q in points if q.family == family and q.size == "p8e04")
        L = p.model["num_layers"]
        assert p.model["hidden_size"] == shape_for_layers(study.shape, L)["hidden_size"]

        def err(layers: int, family: str = family) -> float:
            dims = shape_for_layers(study.shape, layers)
            flags = {k: v for k, v in study.families[family].items() if k != "xlstm_ratio"}
            if "xlstm_ratio" in study.families[family]:
                flags["xlstm_pattern"] = ratio_pattern(layers, study.families[family]["xlstm_ratio"])
            count = counter.counts({**study.train, **flags, **dims}, "test")[1]  # non-embedding
            return abs(math.log(count / 80000))

        assert abs(math.log(p.params_non_embedding / 80000)) == pytest.approx(err(L))
        assert err(L) <= err(L + 1) and (L == 1 or err(L) <= err(L - 1)), (family, L)


def test_solved_shapes_follow_the_aspect_rule():
    shape = dict(aspect=16, width_multiple=16, head_dim=16)
    assert shape_for_layers(shape, 3) == {"num_layers": 3, "hidden_size": 48, "num_attention_heads": 2}
    assert shape_for_layers(shape, 4) == {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4}
    assert ratio_pattern(8, "7:1") == "mmmmsmmm" and ratio_pattern(4, "1:0") == "mmmm"
    assert ratio_pattern(48, "7:1").count("s") == 6


def test_config_hash_is_the_flags_not_the_place():
    flags = {"lr": 1e-3, "num_layers": 2}
    assert config_hash({**flags, "save": "a"}) == config_hash({"num_layers": 2, "lr": 1e-3, "save": "b"})
    assert config_hash(flags) != config_hash({**flags, "lr": 2e-3})


def test_a_point_directory_made_for_other_flags_is_refused(grid, tmp_path):
    import copy

    from xlstm_megatron.studies.runner import prepare

    _, _, points = grid
    prepare(tmp_path, STUDY, points[:2])
    prepare(tmp_path, STUDY, points[:2])  # the same flags again: fine
    changed = copy.deepcopy(points[0])
    changed.config_hash = "0123456789ab"
    with pytest.raises(ConfigError, match="was run with other flags") as e:
        prepare(tmp_path, STUDY, [changed])
    assert "\n" not in str(e.value)


def test_pattern_cycle_families_mamba2_and_hybrid(tmp_path):
    """`pattern_cycle` repeats layer symbols to each point's depth: a Mamba-2 family ('M', counted from the layer
    registry; it trains where mamba-ssm imports) and an mLSTM/Mamba hybrid, counted like any other family."""
    import yaml

    from xlstm_megatron.layers.config import make_xlstm_config
    from xlstm_megatron.models.param_count import count_parameters
    from xlstm_megatron.training.command import add_runner_args

    mamba = {"mamba_head_dim": 16, "mamba_num_groups": 1, "mamba_state_dim": 16}
    doc = yaml.safe_load(STUDY.read_text())
    doc["families"] = {"mamba2": {"xlstm_block": "large", "pattern_cycle": "M", **mamba},
                       "hybrid": {"xlstm_block": "large", "pattern_cycle": "mM", **mamba}}
    doc["sizes"], doc["lrs"], doc["budgets"] = [{"num_layers": 3, "hidden_size": 32, "num_attention_heads": 2}], \
        [1e-3], {"tokens": [1000]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    points = {p.family: p for p in materialise(load_study(path), add_runner_args)}
    assert points["mamba2"].model["xlstm_pattern"] == "MMM" and points["hybrid"].model["xlstm_pattern"] == "mMm"
    for p in points.values():
        config = make_xlstm_config("large", num_layers=3, hidden_size=32, num_attention_heads=2,
                                   xlstm_pattern=p.model["xlstm_pattern"], **mamba)
        assert p.params_total == count_parameters(config, 256)


def test_pattern_cycle_with_a_ratio_is_refused(tmp_path):
    import yaml

    doc = yaml.safe_load(STUDY.read_text())
    doc["families"] = {"bad": {"xlstm_block": "v1", "xlstm_ratio": "3:1", "pattern_cycle": "m"}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="families.bad.pattern_cycle"):
        load_study(path)

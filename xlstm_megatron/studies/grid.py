"""Study files and their grids: families x sizes x budgets x learning rates, one run config per point.

A study file (YAML) declares the grid; every key below the top level is a run-config key (a Megatron / xLSTM /
`xlstm-megatron train` argument name, as in `configs/*.yaml`):

    name: demo
    families:                          # name -> model flags of that family
      xlstm_v1: {xlstm_block: v1}
      xlstm_7_1: {xlstm_block: v1, xlstm_ratio: "7:1"}   # study key: sLSTM blocks spread evenly (m:s)
      mamba2: {xlstm_block: large, pattern_cycle: "M"}     # study key: the pattern repeats these symbols (Mamba-2
                                                           # where mamba-ssm imports; "mM": a hybrid)
      llama: {model_family: transformer}
    sizes:                             # explicit shapes and/or target parameter counts
      - {num_layers: 2, hidden_size: 64, num_attention_heads: 2}
      - {params: 2.0e5}
    shape: {count: non_embedding, aspect: 32, width_multiple: 32, head_dim: 32, max_layers: 32}
    budgets: {tokens: [2.0e5, 4.0e5]}  # or {flops: [...]}: tokens = FLOPs / (the point's training FLOPs per token)
    lrs: [3.0e-3]                      # or {family: [...]} per family
    train: {seq_length: 128, micro_batch_size: 8, global_batch_size: 16, demo_data: true, ...}

A target count is solved for width and depth with the fixed aspect rule hidden = aspect x layers (rounded to
`width_multiple`, at least one multiple) and heads about hidden / head_dim (a power of two): the depth whose exact
parameter count (the `count` kind: all parameters or the non-embedding ones, from the family's closed-form count) is
nearest the target in log space. Per point the study sets `train_iters` = ceil(tokens / (global batch x
sequence)), `min_lr` = lr / 10 (unless `train` sets it), a final evaluation (`eval_interval` = train_iters unless
set), two checkpoints (resume), iteration times in TensorBoard (tokens/s) and the run's `--save`. Every mistake is
one ConfigError line naming the study file and the key.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlstm_megatron.runs.errors import ConfigError

ExtraArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser] | None
TOP_KEYS = ("name", "families", "sizes", "shape", "budgets", "lrs", "train")
SHAPE_DEFAULTS: dict[str, Any] = dict(count="non_embedding", aspect=32, width_multiple=32, head_dim=32, min_layers=1,
                                      max_layers=48)
STUDY_FAMILY_KEYS = ("xlstm_ratio", "pattern_cycle")  # family keys the study resolves per point (not run flags)
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads")


@dataclass(frozen=True)
class Study:
    path: str
    name: str
    families: dict[str, dict[str, Any]]
    sizes: list[dict[str, Any]]
    shape: dict[str, Any]
    budget_kind: str  # "tokens" | "flops"
    budgets: list[float]
    lrs: dict[str, list[float]]
    train: dict[str, Any]


@dataclass
class Point:
    """One run of the grid: its flags (a run config), identity and the counts the fits need."""

    id: str
    family: str
    size: str
    tokens: int
    lr: float
    flop_budget: float | None
    model: dict[str, Any]
    train: dict[str, Any]
    params_total: int = 0
    params_non_embedding: int = 0
    train_flops_per_token: int = 0
    config_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return float(self.train_flops_per_token) * self.tokens

    def run_config(self, save: str | Path) -> dict[str, Any]:
        return {"model": dict(self.model), "train": {**self.train, "save": str(save)}}

    def record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "id", "family", "size", "tokens", "lr", "flop_budget", "model", "train", "params_total",
            "params_non_embedding", "train_flops_per_token", "config_hash")} | {"flops": self.flops}


def _fail(path: str, where: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {message}")


def _number(path: str, where: str, value: Any, integer: bool = False) -> float:
    if isinstance(value, str):  # PyYAML reads 1.0e5 (no exponent sign: YAML 1.1) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _fail(path, where, f"{value!r} must be a positive number")
    if integer and value != int(value):
        raise _fail(path, where, f"{value!r} must be a whole number")
    return int(value) if integer else float(value)


def _numbers(path: str, where: str, value: Any) -> list[float]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(path, where, "is empty; give at least one value")
    return [_number(path, where, v) for v in items]


def load_study(path: str | Path) -> Study:
    """Read and check a study file (structure only; run flags are checked when the points are materialised)."""
    import yaml

    path = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"study file {path!r} does not exist")
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a study file is a mapping with keys {list(TOP_KEYS)}")
    for key in doc:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            raise _fail(path, str(key), "unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                                          f"; use {list(TOP_KEYS)}"))
    for key in ("families", "sizes", "budgets", "lrs", "train"):
        if doc.get(key) in (None, {}, []):
            raise _fail(path, key, "missing; a study needs families, sizes, budgets, lrs and train")
    families = doc["families"]
    if not isinstance(families, dict):
        raise _fail(path, "families", "must map a family name to its model flags, e.g. {llama: {model_family: "
                    "transformer}}")
    for name, flags in families.items():
        if not re.fullmatch(r"[A-Za-z0-9_.]+", str(name)):
            raise _fail(path, f"families.{name}", "a family name is letters, digits, '_' and '.'")
        if not isinstance(flags, dict):
            raise _fail(path, f"families.{name}", "must be a mapping of model flags ({} for the defaults)")
        if "xlstm_ratio" in flags and not re.fullmatch(r"\d+:\d+", str(flags["xlstm_ratio"])):
            raise _fail(path, f"families.{name}.xlstm_ratio", f"{flags['xlstm_ratio']!r} must read 'm:s', e.g. '7:1'")
        if "pattern_cycle" in flags and ("xlstm_ratio" in flags or "xlstm_pattern" in flags
                                         or not str(flags["pattern_cycle"])):
            raise _fail(path, f"families.{name}.pattern_cycle", "a non-empty string of layer symbols, without "
                        "xlstm_ratio or xlstm_pattern (each sets the pattern)")
    shape = {**SHAPE_DEFAULTS, **(doc.get("shape") or {})}
    for key in shape:
        if key not in SHAPE_DEFAULTS:
            close = difflib.get_close_matches(key, SHAPE_DEFAULTS, n=1)
            raise _fail(path, f"shape.{key}", "unknown key" + (f"; did you mean {close[0]!r}?" if close else ""))
    if shape["count"] not in ("total", "non_embedding"):
        raise _fail(path, "shape.count", f"{shape['count']!r}: use 'total' or 'non_embedding'")
    for key in ("aspect", "width_multiple", "head_dim", "min_layers", "max_layers"):
        shape[key] = _number(path, f"shape.{key}", shape[key], integer=key != "aspect")
    sizes = doc["sizes"]
    if not isinstance(sizes, list):
        raise _fail(path, "sizes", "must be a list of {num_layers, hidden_size, num_attention_heads} or {params: N}")
    for i, size in enumerate(sizes):
        where = f"sizes[{i}]"
        if not isinstance(size, dict) or not (set(size) == {"params"} or set(size) == set(SHAPE_KEYS)):
            raise _fail(path, where, f"{size!r} must be {{params: N}} or exactly {{{', '.join(SHAPE_KEYS)}}}")
    sizes = [{key: _number(path, f"sizes[{i}].{key}", value, integer=key != "params") for key, value in size.items()}
             for i, size in enumerate(sizes)]
    budgets = doc["budgets"]
    if not isinstance(budgets, dict) or len(budgets) != 1 or next(iter(budgets)) not in ("tokens", "flops"):
        raise _fail(path, "budgets", "must be {tokens: [...]} or {flops: [...]}")
    kind = next(iter(budgets))
    lrs = doc["lrs"]
    if isinstance(lrs, dict):
        unknown = sorted(set(lrs) - set(families))
        if unknown:
            raise _fail(path, "lrs", f"names families {unknown} that `families` does not declare")
        missing = sorted(set(families) - set(lrs))
        if missing:
            raise _fail(path, "lrs", f"gives no learning rates for families {missing}")
        lr_map = {f: _numbers(path, f"lrs.{f}", v) for f, v in lrs.items()}
    else:
        lr_map = dict.fromkeys(families, _numbers(path, "lrs", lrs))
    train = doc["train"]
    if not isinstance(train, dict):
        raise _fail(path, "train", "must be a mapping of run flags shared by every point")
    for key in ("save", "load", "train_iters", "train_samples", "lr", *SHAPE_KEYS):
        if key in train:
            raise _fail(path, f"train.{key}", "is set per point by the study; drop it")
    for name, flags in families.items():
        both = sorted(set(flags) & set(train))
        if both:
            raise _fail(path, f"families.{name}.{both[0]}", "is also in `train`; keep it in one place")
        for key in ("save", "load", "lr", *SHAPE_KEYS):
            if key in flags:
                raise _fail(path, f"families.{name}.{key}", "is set per point by the study; drop it")
    return Study(path, str(doc.get("name") or Path(path).stem), families, sizes, shape, kind,
                 _numbers(path, f"budgets.{kind}", budgets[kind]), lr_map, train)


# ---- from a study to run configs -------------------------------------------------------------------------------


def ratio_pattern(num_layers: int, ratio: str) -> str:
    """xLSTM[m:s] as a pattern: round(L x s / (m + s)) sLSTM blocks (at least one when s > 0), spread evenly at
    the middle of equal segments; mLSTM elsewhere."""
    m, s = (int(x) for x in ratio.split(":"))
    n_s = 0 if s == 0 else min(num_layers, max(1, round(num_layers * s / (m + s))))
    at = {int((k + 0.5) * num_layers / n_s) for k in range(n_s)}
    return "".join("s" if i in at else "m" for i in range(num_layers))


def config_hash(flags: dict[str, Any]) -> str:
    """A point's identity: its run flags (without where it is saved), canonical JSON, sha256, 12 hex digits."""
    body = {k: v for k, v in flags.items() if k not in ("save", "load")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _label(value: float) -> str:
    return f"{value:.3g}".replace("+", "")


class Counter:
    """Parses a point's flags the way `xlstm-megatron train` does (Megatron's parser with the family applied and
    Megatron's `validate_args`) and counts its parameters and FLOPs; caches tokenizers and counts."""

    def __init__(self, study: Study, extra_args_provider: ExtraArgsProvider) -> None:
        from xlstm_megatron.runs.args import megatron_parser

        self.study = study
        self.extra = extra_args_provider
        self.parser = megatron_parser(extra_args_provider)
        self._vocab: dict[tuple, int] = {}
        self._counts: dict[str, tuple[int, int, int]] = {}

    def argv(self, flags: dict[str, Any], where: str) -> list[str]:
        from xlstm_megatron.runs.args import yaml_to_argv

        try:
            return yaml_to_argv({"train": flags}, self.parser)
        except ConfigError as e:
            raise _fail(self.study.path, where, str(e)) from None

    def _padded_vocab(self, args: argparse.Namespace) -> int:
        """The padded vocabulary Megatron will build (its tokenizer, its padding rule)."""
        from megatron.training.vocab_utils import calculate_padded_vocab_size

        key = (args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.vocab_size,
               getattr(args, "demo_data", False), getattr(args, "demo_vocab_size", None))
        if key not in self._vocab:
            if args.tokenizer_type == "NullTokenizer":  # its vocabulary is --vocab-size (no import of HF's stack)
                self._vocab[key] = int(args.vocab_size)
            else:
                from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

                self._vocab[key] = build_tokenizer(args).vocab_size
        with contextlib.redirect_stdout(io.StringIO()):  # Megatron prints the padding every call
            return calculate_padded_vocab_size(self._vocab[key], args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size)

    def _demo_flags(self, argv: list[str]) -> list[str]:
        """`demo_data: true`: the data and tokenizer flags the train command will set (the corpus and BPE are
        prepared once here, cached; the run finds them)."""
        probe, _ = self.parser.parse_known_args(argv)
        if not getattr(probe, "demo_data", False):
            return argv
        from xlstm_megatron.data.preprocess import prepare_demo_data

        prefix, tok_dir = prepare_demo_data(probe.demo_data_dir, probe.demo_vocab_size, max_plays=probe.demo_max_plays)
        return argv + ["--data-path", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
                       "--tokenizer-model", str(tok_dir)]

    def counts(self, flags: dict[str, Any], where: str) -> tuple[int, int, int]:
        """(total parameters, non-embedding parameters, training FLOPs per token) of a run config."""
        key = config_hash(flags)
        if key in self._counts:
            return self._counts[key]
        from xlstm_megatron.compat import enable_pretrain_shims
        from xlstm_megatron.runs.args import megatron_args
        from xlstm_megatron.runs.model import parameter_counts_from_args, train_flops_per_token_from_args

        enable_pretrain_shims()  # validate_args asks the GPU about itself
        argv = self._demo_flags(self.argv(flags, where))
        world = int(flags.get("nproc", 1))
        try:
            args = megatron_args(argv, self.extra, world_size=world)
        except ConfigError as e:
            raise _fail(self.study.path, where, str(e)) from None
        except AssertionError as e:
            raise _fail(self.study.path, where, f"Megatron refuses these arguments: {e}".splitlines()[0]) from None
        except SystemExit:
            raise _fail(self.study.path, where, "bad flags (see the usage error above)") from None
        args.padded_vocab_size = self._padded_vocab(args)
        try:
            params = parameter_counts_from_args(args)
            result = (params["total"], params["non_embedding"], train_flops_per_token_from_args(args))
        except ConfigError as e:
            raise _fail(self.study.path, where, str(e)) from None
        self._counts[key] = result
        return result


def _family_flags(family: dict[str, Any], num_layers: int) -> dict[str, Any]:
    flags = {k: v for k, v in family.items() if k not in STUDY_FAMILY_KEYS}
    if "xlstm_ratio" in family:
        flags["xlstm_pattern"] = ratio_pattern(num_layers, str(family["xlstm_ratio"]))
    if "pattern_cycle" in family:
        cycle = str(family["pattern_cycle"])
        flags["xlstm_pattern"] = (cycle * num_layers)[:num_layers]
    return flags


def shape_for_layers(shape: dict[str, Any], num_layers: int) -> dict[str, int]:
    """The aspect rule: hidden = aspect x layers rounded to width_multiple (at least one); heads: the largest power of
    two at most hidden / head_dim that divides hidden."""
    mult = shape["width_multiple"]
    hidden = max(mult, round(shape["aspect"] * num_layers / mult) * mult)
    heads = 1 << (max(1, hidden // shape["head_dim"]).bit_length() - 1)
    while hidden % heads:  # a power of two: the v1 mLSTM's inner width round_up(2E, 64) splits into such heads
        heads //= 2
    return {"num_layers": num_layers, "hidden_size": hidden, "num_attention_heads": heads}


def solve_shape(study: Study, counter: Counter, family: str, target: float, base: dict[str, Any]
                ) -> dict[str, int]:
    """The aspect-rule shape whose parameter count (study.shape['count']) is nearest `target` in log space. The
    count grows with depth under the rule, so a bisection finds the first depth at or above the target."""
    shape = study.shape
    index = 0 if shape["count"] == "total" else 1
    where = f"families.{family} at params {target:g}"

    def count(layers: int) -> int:
        dims = shape_for_layers(shape, layers)
        return counter.counts({**base, **_family_flags(study.families[family], layers), **dims}, where)[index]

    lo, hi = shape["min_layers"], shape["max_layers"]
    if count(hi) < target:
        raise _fail(study.path, f"sizes: params {target:g}", f"the {family} family reaches only {count(hi):,} "
                    f"parameters at shape.max_layers={hi}; raise max_layers or aspect")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    best = min({lo, max(shape["min_layers"], lo - 1)}, key=lambda n: abs(math.log(count(n) / target)))
    return shape_for_layers(shape, best)


def materialise(study: Study, extra_args_provider: ExtraArgsProvider, counter: Counter | None = None) -> list[Point]:
    """Every point of the grid, with its run flags, counts and config hash (checked as the train command would)."""
    counter = counter or Counter(study, extra_args_provider)
    train = dict(study.train)
    gbs = train.get("global_batch_size") or train.get("micro_batch_size")
    seq = train.get("seq_length")
    if not gbs or not seq:
        raise _fail(study.path, "train", "set seq_length and global_batch_size (tokens per step)")
    points: list[Point] = []
    seen: set[str] = set()
    for family, family_flags in study.families.items():
        for size in study.sizes:
            if "params" in size:
                dims = solve_shape(study, counter, family, float(size["params"]), train)
                size_label = f"p{_label(size['params'])}"
            else:
                dims = {k: int(size[k]) for k in SHAPE_KEYS}
                size_label = "L{num_layers}-E{hidden_size}-H{num_attention_heads}".format(**dims)
            model = {**_family_flags(family_flags, dims["num_layers"]), **dims}
            where = f"families.{family} x sizes {size_label}"
            _, _, per_token = counter.counts({**train, **model}, where)
            for budget in study.budgets:
                tokens_wanted = budget if study.budget_kind == "tokens" else budget / per_token
                iters = max(1, math.ceil(tokens_wanted / (gbs * seq)))
                for lr in study.lrs[family]:
                    run = dict(train, train_iters=iters, lr=lr)
                    run.setdefault("min_lr", lr / 10)
                    run.setdefault("eval_interval", iters)
                    run.setdefault("save_interval", max(1, math.ceil(iters / 2)))
                    run.setdefault("log_timers_to_tensorboard", True)  # iteration times -> tokens/s in the table
                    kind = "T" if study.budget_kind == "tokens" else "C"
                    pid = f"{family}-{size_label}-{kind}{_label(budget)}-lr{_label(lr)}"
                    total, non_emb, per_token = counter.counts({**run, **model}, where)
                    p = Point(pid, family, size_label, iters * gbs * seq, lr,
                              budget if study.budget_kind == "flops" else None, model, run,
                              total, non_emb, per_token)
                    p.config_hash = config_hash({**run, **model})
                    if p.config_hash in seen:  # a target count that solves to a shape listed too: run it once
                        continue
                    seen.add(p.config_hash)
                    points.append(p)
    ids = [p.id for p in points]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise _fail(study.path, "sizes", f"two grid points are the same run ({dup[0]}); remove the duplicate")
    return points

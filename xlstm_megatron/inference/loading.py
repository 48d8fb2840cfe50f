"""A model for generation from a checkpoint directory written by `xlstm-megatron train`.

The directory holds `run_config.yaml` (the run's `model` and `train` sections), `latest_checkpointed_iteration.txt`
and `iter_NNNNNNN/` dist checkpoints. Only the model weights are read (no optimizer); dist checkpoints reshard, so
any tensor-parallel size that divides the heads and the padded vocab works, and a pipeline-parallel checkpoint loads
into one stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from xlstm_megatron.training import checkpoint as ckpt
from xlstm_megatron.training.run_config import ConfigError, RunConfig

RUN_CONFIG = "run_config.yaml"


@dataclass(frozen=True)
class CheckpointSource:
    """What a generation worker needs to rebuild the model (small and picklable)."""

    model_kwargs: dict[str, Any]
    run: RunConfig
    """The training run's config with the generation layout: TP as asked, PP 1, no sequence parallel."""
    path: Path
    """The iteration directory."""
    vocab_size: int


def resolve_checkpoint(root: str | Path, iteration: int | None = None, tensor_parallel: int | None = None,
                       seed: int | None = None) -> CheckpointSource:
    """Read the run config and the checkpoint's architecture record; raises ConfigError with the fix."""
    from xlstm_megatron.training.trainer import build_model_config

    root = Path(root)
    config_file = root / RUN_CONFIG
    if not config_file.is_file():
        raise ConfigError(f"{config_file} not found; --load must be a directory written by `xlstm-megatron train`")
    doc = yaml.safe_load(config_file.read_text()) or {}
    model_kwargs = dict(doc.get("model") or {})
    train = {f.name: doc["train"][f.name] for f in dataclasses.fields(RunConfig) if f.name in (doc.get("train") or {})}
    if iteration is None:
        iteration = ckpt.latest_iteration(root)
        if iteration is None:
            raise ConfigError(f"{root} has no {ckpt.LATEST}; train (with --save) first or pass --iteration")
    path = ckpt.iteration_dir(root, iteration)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist; pick an iteration that was saved")
    tp = tensor_parallel or train.get("tensor_model_parallel_size", 1)
    run = dataclasses.replace(
        RunConfig(**train), tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, sequence_parallel=False, nproc=tp,
        seed=train.get("seed", 1234) if seed is None else seed,
    )
    from megatron.core import dist_checkpointing

    arch = dist_checkpointing.load_common_state_dict(str(path)).get("arch")
    if arch is None:
        raise ConfigError(f"{path} is not an xlstm-megatron checkpoint (no architecture record); check --load")
    config = build_model_config(model_kwargs, run)
    ckpt.check_architecture(path, ckpt.architecture(config, arch["vocab_size"]))
    if arch["vocab_size"] % tp:
        raise ConfigError(f"the checkpoint's vocab {arch['vocab_size']} does not split over TP={tp}; use another TP")
    return CheckpointSource(model_kwargs, run, path, arch["vocab_size"])


@torch.no_grad()
def load_model(source: CheckpointSource) -> torch.nn.Module:
    """Build the model on this rank (parallel state initialised for `source.run`) and load its weights."""
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.module import Float16Module

    from xlstm_megatron.models.xlstm_model import XLSTMModel
    from xlstm_megatron.training.trainer import build_model_config

    config = build_model_config(source.model_kwargs, source.run)
    model: torch.nn.Module = XLSTMModel(config, source.vocab_size, source.run.seq_length)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if source.run.bf16:
        model = Float16Module(config, model)
    sharded = {"model": model.sharded_state_dict(metadata={"singleton_local_shards": False})}
    loaded = dist_checkpointing.load(sharded, str(source.path))
    model.load_state_dict(loaded["model"])
    return model.eval()

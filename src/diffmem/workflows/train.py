"""Fine-tune a Stable-Diffusion-architecture model on a training set (a lab dataset, an image folder, a
saved ``datasets`` dataset, WebDataset shards) with training-time policies: the Python side of
``diffmem train``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from accelerate import PartialState

from diffmem.errors import DiffmemError
from diffmem.models.source import ModelSource
from diffmem.train.fine_tune import FineTuneConfig, FineTuneStatus, fine_tune
from diffmem.train.training_set import DataOptions
from diffmem.workflows.runtime import Runtime


@dataclass(frozen=True)
class TrainConfig:
    """The pipeline to fine-tune, the training set and how it is read and prepared, the optimisation and
    policies (the seed is the runtime's), and the time budget after which the run checkpoints and stops."""

    model: Path | str  # a pipeline directory, a shipped model (builtin:lab-keyed) or a cached Hub id
    data: Path | str  # a folder, a .tar shard, or a Hub dataset id in the local cache
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    time_budget_s: float | None = None
    data_options: DataOptions = field(default_factory=DataOptions)


def train_model(config: TrainConfig, out: Path, runtime: Runtime | None = None) -> FineTuneStatus | None:
    """Fine-tune the UNet (or a LoRA adapter on it) into ``out``, or continue an interrupted run; None in a
    process of an ``accelerate launch`` other than the main one (which reports).

    ``data_report.json`` (the rows read and those skipped; not for a lab dataset) and a checkpoint are
    written to ``out`` while it runs, and ``model/`` (a LoRA run's adapter: ``lora/``) and
    ``fine_tune.json`` at the end.
    """
    runtime = runtime or Runtime()
    settings = replace(config.fine_tune, seed=runtime.seed)
    status = fine_tune(
        _pipeline_directory(config.model),
        config.data,
        out,
        settings,
        time_budget_s=config.time_budget_s,
        data_options=config.data_options,
    )
    return status if PartialState().is_main_process else None


def _pipeline_directory(model: Path | str) -> Path:
    """The diffusers directory of ``model``: a local one as given, a shipped model's, or a cached Hub
    snapshot's."""
    if Path(model).is_dir():
        return Path(model)
    source = ModelSource.resolve(str(model))
    if source.directory is None or source.checkpoint is not None or source.spec.loras:
        raise DiffmemError(
            f"{model} is not a diffusers pipeline: fine-tuning starts from a pipeline directory, a shipped "
            "lab model (builtin:lab-keyed) or a Hub id in the local cache"
        )
    return source.directory

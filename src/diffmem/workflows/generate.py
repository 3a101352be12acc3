"""Generate images for prompts (or class labels), plainly or with a mitigation, optionally behind the
calibrated guard: the Python side of ``diffmem generate``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from PIL import Image

from diffmem.core.method_spec import parse_method_spec
from diffmem.errors import DiffmemError
from diffmem.io.atomic import write_parquet_atomic
from diffmem.io.output_dirs import check_output_dir, clear_output_dir
from diffmem.io.run_record import write_summary
from diffmem.mitigate import (
    MitigatedGeneration,
    ReferenceSet,
    SamplingOptions,
    mitigated_generate,
    mitigation_config,
)
from diffmem.mitigate.registry import TAKES_REFERENCE
from diffmem.mitigate.training_similarity import measure_against_training
from diffmem.models.names import DEFAULT_MODEL
from diffmem.models.source import ModelSource
from diffmem.models.spec import ModelSpec
from diffmem.sampling.schedulers import scheduler_like
from diffmem.workflows.calibrate import calibrated_settings, left_to_profile, model_profile
from diffmem.workflows.inputs import calibrated_guard, conditioning_items, training_reference
from diffmem.workflows.runtime import Runtime

OUTPUTS = ("images", "generations.parquet", "summary.json")


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate and how: prompts (or class labels) given and/or read from ``prompts_file``."""

    prompts: list[str] = field(default_factory=list)
    model: str | ModelSpec = DEFAULT_MODEL
    prompts_file: Path | None = None
    column: str = "prompt"
    n_generations: int = 1
    num_inference_steps: int = 50
    guidance_scale: float | None = None  # None: the model family's
    scheduler: str | None = None  # ddim, ddpm, pndm, euler, ...; None: the model's own
    eta: float = 0.0
    batch_size: int = 8
    mitigation: str = "none"  # NAME[:key=value,...]
    index: Path | None = None  # the training set: AMG's reference, and nearest-image columns
    encoder: Path | None = None  # an embedding index's copy-detection encoder (default: the one it records)
    guard: bool = False  # mitigate only the prompts the calibrated first-step detector flags
    calibration: Path | None = None  # the guard's (default: a shipped model's own)


@dataclass(frozen=True)
class GenerationRun:
    """The images of a run with one row per image (``table``) and the run's record."""

    generation: MitigatedGeneration
    table: pa.Table
    config: dict[str, Any]
    counts: dict[str, Any]

    def save(self, out: Path, overwrite: bool = False) -> list[Path]:
        """Write ``images/*.png``, ``generations.parquet`` (with each image's path) and ``summary.json``
        into ``out``: a new or empty directory, or an earlier run's with ``overwrite``."""
        check_output_dir(out, OUTPUTS, overwrite)
        clear_output_dir(out, OUTPUTS)
        (out / "images").mkdir()
        paths = []
        images = self.generation.images
        for image, prompt_id, number in zip(images, self.generation.prompt_id, self.generation.generation):
            path = out / "images" / f"{prompt_id:06d}_{number:02d}.png"
            Image.fromarray((image.permute(1, 2, 0) * 255).round().to("cpu").byte().numpy()).save(path)
            paths.append(path)
        relative = pa.array([str(p.relative_to(out)) for p in paths], pa.string())
        write_parquet_atomic(self.table.append_column("image", relative), out / "generations.parquet")
        write_summary(out / "summary.json", self.config, self.counts)
        return paths


def generate_images(config: GenerateConfig, runtime: Runtime | None = None) -> GenerationRun:
    """Sample every prompt's generations with the configured mitigation (and guard), in memory."""
    runtime = runtime or Runtime()
    source = ModelSource.resolve(config.model)
    name, settings = parse_method_spec(config.mitigation)
    index, encoder = config.index, config.encoder
    if index is None and name in TAKES_REFERENCE and source.reference is not None:
        index, encoder = source.reference  # the lab model's own training set
    if encoder is not None and index is None:
        raise DiffmemError("--encoder goes with an embedding index: give --index too")
    reference = training_reference(index, encoder, runtime.device, source) if index else None
    given = {**settings, **({"reference": reference} if name in TAKES_REFERENCE else {})}
    mitigation_config(name, **calibrated_settings(name, given, None))  # settings checked before any work
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    left = left_to_profile(name, settings)
    guarded = config.guard and config.calibration is None and source.calibration is None
    profile = None
    if (left or guarded) and denoiser.conditioning == "text":
        # against the command's index when it has one: its single-copy captions are the model's own kind of text
        profile = model_profile(source, runtime, denoiser, *((index, encoder) if index else ()))
    settings = calibrated_settings(name, settings, profile, reference)
    if name in TAKES_REFERENCE:
        settings["reference"] = reference
    method = mitigation_config(name, **settings)
    guard = calibrated_guard(source, config.calibration, profile) if config.guard else None
    items = conditioning_items(
        denoiser.conditioning, list(config.prompts), config.prompts_file, config.column
    )
    steps = scheduler_like(config.scheduler, denoiser.scheduler) if config.scheduler else None
    sampling = SamplingOptions(config.num_inference_steps, config.guidance_scale, steps, config.eta)
    result = mitigated_generate(
        denoiser,
        items,
        name,
        method,
        n_generations=config.n_generations,
        base_seed=runtime.seed,
        batch_size=config.batch_size,
        sampling=sampling,
        guard=guard,
        progress=True,
    )
    table = result.to_table()
    if reference is not None:
        table = _with_nearest(table, result.images, reference)
    record = {
        "model": source.name,
        **runtime.describe(),
        "n_generations": config.n_generations,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": denoiser.default_guidance_scale
        if config.guidance_scale is None
        else config.guidance_scale,
        "scheduler": config.scheduler or type(denoiser.scheduler).__name__,
        "eta": config.eta,
        "mitigation": name,
        "mitigation_settings": {k: v for k, v in settings.items() if k != "reference"},
        "index": None if index is None else str(index),
        "guard_threshold": None if guard is None else guard.threshold,
    }
    mitigated = sum(m != "none" for m in result.method)
    counts = {
        "images": len(result.method),
        "mitigated": mitigated,
        "changed": sum(steps > 0 for steps in result.guided_steps),  # images the mitigation altered
        "unet_evaluations": result.unet_evaluations,
    }
    return GenerationRun(result, table, record, counts)


def _with_nearest(table: pa.Table, images: torch.Tensor, reference: ReferenceSet) -> pa.Table:
    """The table with each image's nearest training image and its similarity (nL2 or copy similarity)."""
    values, ids = measure_against_training(images, reference)
    table = table.append_column("nearest_training_id", pa.array(ids, pa.int64()))
    return table.append_column(reference.measure, pa.array(values, pa.float64()))

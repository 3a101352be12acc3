"""``diffmem generate``: images for prompts (or class labels), plainly or with a mitigation (optionally
behind the guard), saved with one Parquet row per image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pyarrow as pa
import torch
import typer
from PIL import Image

from diffmem.atomic_io import write_parquet_atomic
from diffmem.cli.app import Settings, app
from diffmem.errors import DiffmemError
from diffmem.method_spec import parse_method_spec
from diffmem.mitigate import (
    MITIGATIONS,
    ReferenceSet,
    SamplingOptions,
    mitigated_generate,
    mitigation_config,
)
from diffmem.mitigate.registry import NEEDS_REFERENCE
from diffmem.mitigate.training_similarity import measure_against_training
from diffmem.model_names import DEFAULT_MODEL
from diffmem.models import ModelSource, open_model, shipped_reference
from diffmem.output_rules import check_output_dir, clear_output_dir
from diffmem.run_record import write_summary
from diffmem.sampling.schedulers import scheduler_like
from diffmem.workflows.inputs import calibrated_guard, conditioning_items, training_reference

GENERATE_OUTPUTS = ("images", "generations.parquet", "summary.json")


@app.command()
def generate(
    ctx: typer.Context,
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Prompts (class labels for class models).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/generate"),
    model: Annotated[
        str | None, typer.Option(help=f"Model directory or builtin:NAME (default {DEFAULT_MODEL}).")
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="A .txt, .jsonl, .csv or .parquet prompt file.")
    ] = None,
    column: Annotated[str, typer.Option(help="Prompt column of a tabular prompt file.")] = "prompt",
    n_generations: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    num_inference_steps: Annotated[
        int, typer.Option("--num-inference-steps", "--steps", help="Sampling steps.")
    ] = 50,
    guidance_scale: Annotated[
        float | None, typer.Option(help="CFG scale (default: the model family's).")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="ddim, ddpm, pndm, euler, ... (default: the model's).")
    ] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta.")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    mitigation: Annotated[
        str,
        typer.Option(
            help=f"none, or a mitigation with settings: NAME[:key=value,...]; one of {', '.join(MITIGATIONS)}."
        ),
    ] = "none",
    index: Annotated[
        Path | None,
        typer.Option(
            help="Training-set index (diffmem index build): AMG's reference; adds nearest-image columns."
        ),
    ] = None,
    encoder: Annotated[
        Path | None,
        typer.Option(help="Copy-detection encoder of an embedding index (default: the one it records)."),
    ] = None,
    guard: Annotated[
        bool, typer.Option(help="Score prompts at the first step; mitigate only those above the threshold.")
    ] = False,
    calibration: Annotated[
        Path | None, typer.Option(help="The guard's noise-norm calibration (default: the lab model's).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run in --out.")] = False,
) -> None:
    """Sample images and write them with ``generations.parquet`` and ``summary.json``."""
    settings: Settings = ctx.obj
    check_output_dir(out, GENERATE_OUTPUTS, overwrite)
    model = model or DEFAULT_MODEL
    name, method_settings = parse_method_spec(mitigation)
    shipped = shipped_reference(model)
    if index is None and name in NEEDS_REFERENCE and shipped is not None:
        index, encoder = shipped  # the lab model's own training set
    reference = (
        training_reference(index, encoder, settings.device, ModelSource.resolve(model)) if index else None
    )
    if encoder is not None and index is None:
        raise DiffmemError("--encoder goes with an embedding index: give --index too")
    if name in NEEDS_REFERENCE:
        method_settings["reference"] = reference
    config = mitigation_config(name, **method_settings)
    guarded = calibrated_guard(ModelSource.resolve(model), calibration) if guard else None
    denoiser = open_model(model, settings.device, settings.dtype, settings.speedups)
    items = conditioning_items(denoiser.conditioning, list(prompts or []), prompts_file, column)
    steps_scheduler = scheduler_like(scheduler, denoiser.scheduler) if scheduler else None
    result = mitigated_generate(
        denoiser,
        items,
        name,
        config,
        n_generations=n_generations,
        base_seed=settings.seed,
        batch_size=batch_size,
        sampling=SamplingOptions(num_inference_steps, guidance_scale, steps_scheduler, eta),
        guard=guarded,
        progress=True,
    )
    clear_output_dir(out, GENERATE_OUTPUTS)
    image_dir = out / "images"
    image_dir.mkdir()
    paths = []
    for image, prompt_id, generation in zip(result.images, result.prompt_id, result.generation):
        path = image_dir / f"{prompt_id:06d}_{generation:02d}.png"
        pixels = (image.permute(1, 2, 0) * 255).round().to("cpu").byte().numpy()
        Image.fromarray(pixels).save(path)
        paths.append(str(path.relative_to(out)))
    table = result.to_table().append_column("image", pa.array(paths, pa.string()))
    if reference is not None:
        table = _with_nearest(table, result.images, reference)
    write_parquet_atomic(table, out / "generations.parquet")
    run_config = {
        "model": model,
        "device": str(settings.device),
        "dtype": str(settings.dtype),
        "seed": settings.seed,
        "n_generations": n_generations,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale if guidance_scale is not None else denoiser.default_guidance_scale,
        "scheduler": scheduler or type(denoiser.scheduler).__name__,
        "eta": eta,
        "mitigation": name,
        "mitigation_settings": {k: v for k, v in method_settings.items() if k != "reference"},
        "index": None if index is None else str(index),
        "guard_threshold": None if guarded is None else guarded.threshold,
    }
    mitigated = sum(m != "none" for m in result.method)
    counts = {"images": len(paths), "mitigated": mitigated, "unet_evaluations": result.unet_evaluations}
    write_summary(out / "summary.json", run_config, counts)
    note = f" ({mitigated} with {name})" if name != "none" else ""
    typer.echo(f"wrote {len(paths)} images{note}, generations.parquet and summary.json to {out}")


def _with_nearest(table: pa.Table, images: torch.Tensor, reference: ReferenceSet) -> pa.Table:
    """The table with each image's nearest training image and its similarity (nL2 or copy similarity)."""
    values, ids = measure_against_training(images, reference)
    table = table.append_column("nearest_training_id", pa.array(ids, pa.int64()))
    return table.append_column(reference.measure, pa.array(values, pa.float64()))

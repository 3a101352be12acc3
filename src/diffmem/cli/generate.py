"""``diffmem generate``: images for prompts (or class labels), saved with one Parquet row per image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.parquet as pq
import typer
from PIL import Image

from diffmem.cli.app import Settings, app
from diffmem.errors import DiffmemError
from diffmem.models import DEFAULT_MODEL, open_model
from diffmem.prompts_io import read_prompts
from diffmem.run_record import write_summary
from diffmem.sampling import generate as generate_images
from diffmem.sampling.schedulers import scheduler_like


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
) -> None:
    """Sample images and write them with ``generations.parquet`` and ``summary.json``."""
    settings: Settings = ctx.obj
    denoiser = open_model(model, settings.device, settings.dtype)
    items = _items(denoiser.conditioning, list(prompts or []), prompts_file, column)
    steps_scheduler = scheduler_like(scheduler, denoiser.scheduler) if scheduler else None
    result = generate_images(
        denoiser,
        items,
        n_generations=n_generations,
        base_seed=settings.seed,
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        scheduler=steps_scheduler,
        eta=eta,
        progress=True,
    )
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, prompt_id, generation in zip(result.images, result.prompt_id, result.generation):
        path = image_dir / f"{prompt_id:06d}_{generation:02d}.png"
        pixels = (image.permute(1, 2, 0) * 255).round().to("cpu").byte().numpy()
        Image.fromarray(pixels).save(path)
        paths.append(str(path.relative_to(out)))
    table = result.to_table().append_column("image", pa.array(paths, pa.string()))
    pq.write_table(table, out / "generations.parquet")
    config = {
        "model": model or DEFAULT_MODEL,
        "device": str(settings.device),
        "dtype": str(settings.dtype),
        "seed": settings.seed,
        "n_generations": n_generations,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale if guidance_scale is not None else denoiser.default_guidance_scale,
        "scheduler": scheduler or type(denoiser.scheduler).__name__,
        "eta": eta,
    }
    write_summary(out / "summary.json", config, {"images": len(paths)})
    typer.echo(f"wrote {len(paths)} images, generations.parquet and summary.json to {out}")


def _items(conditioning: str, prompts: list[str], prompts_file: Path | None, column: str) -> list:
    """What to condition each prompt row on, by the model's kind of conditioning."""
    if prompts_file is not None:
        prompts += read_prompts(prompts_file, column)
    if conditioning == "none":
        if prompts:
            raise DiffmemError("this model is unconditional: give no prompts, only --n-generations")
        return [None]
    if not prompts:
        raise DiffmemError("give prompts as arguments or with --prompts-file")
    if conditioning == "class":
        try:
            return [int(p) for p in prompts]
        except ValueError as error:
            raise DiffmemError(
                f"this model is class-conditional: prompts must be class numbers ({error})"
            ) from error
    return prompts

"""``diffmem generate``: images for prompts (or class labels), plainly or with a mitigation (optionally
behind the guard), saved with one Parquet row per image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import app
from diffmem.cli.model_options import with_model_options
from diffmem.cli.scan import EncoderOption
from diffmem.models.names import DEFAULT_MODEL

MITIGATION_NAMES = (  # mitigate.registry.MITIGATIONS, named without importing it
    "none", "prompt_optimization", "amg", "gni", "rt", "cwr", "rna", "transition_static", "transition_dynamic",
    "bos_scaling",
)  # fmt: skip


Prompts = Annotated[list[str] | None, typer.Argument(help="Prompts (class labels for class models).")]
Out = Annotated[Path, typer.Option(help="Output directory.")]
Model = Annotated[
    str | None,
    typer.Option(
        help=f"Diffusers directory, Hub id, .safetensors/.ckpt file or builtin:NAME (default {DEFAULT_MODEL})."
    ),
]
PromptsFile = Annotated[Path | None, typer.Option(help="A .txt, .jsonl, .csv or .parquet prompt file.")]
Column = Annotated[str, typer.Option(help="Prompt column of a tabular prompt file.")]
NGenerations = Annotated[int, typer.Option(help="Images per prompt.")]
NumInferenceSteps = Annotated[int, typer.Option("--num-inference-steps", "--steps", help="Sampling steps.")]
GuidanceScale = Annotated[float | None, typer.Option(help="CFG scale (default: the model family's).")]
Scheduler = Annotated[str | None, typer.Option(help="ddim, ddpm, pndm, euler, ... (default: the model's).")]
Eta = Annotated[float, typer.Option(help="DDIM eta.")]
BatchSize = Annotated[int, typer.Option(help="Images per batch.")]
Mitigation = Annotated[
    str,
    typer.Option(
        help=f"none, or a mitigation with settings: NAME[:key=value,...]; one of {', '.join(MITIGATION_NAMES)}."
    ),
]
Index = Annotated[
    Path | None,
    typer.Option(
        help="Training-set index (diffmem index build): AMG's reference; adds nearest-image columns."
    ),
]
Guard = Annotated[
    bool, typer.Option(help="Score prompts at the first step; mitigate only those above the threshold.")
]
Calibration = Annotated[
    Path | None, typer.Option(help="The guard's noise-norm calibration (default: the lab model's).")
]
Overwrite = Annotated[bool, typer.Option(help="Replace an earlier run in --out.")]


@app.command()
@with_model_options
def generate(
    ctx: typer.Context,
    prompts: Prompts = None,
    out: Out = Path("out/generate"),
    model: Model = None,
    prompts_file: PromptsFile = None,
    column: Column = "prompt",
    n_generations: NGenerations = 1,
    num_inference_steps: NumInferenceSteps = 50,
    guidance_scale: GuidanceScale = None,
    scheduler: Scheduler = None,
    eta: Eta = 0.0,
    batch_size: BatchSize = 8,
    mitigation: Mitigation = "none",
    index: Index = None,
    encoder: EncoderOption = None,
    guard: Guard = False,
    calibration: Calibration = None,
    overwrite: Overwrite = False,
) -> None:
    """Sample images and write them with ``generations.parquet`` and ``summary.json``."""
    from diffmem.io.output_dirs import check_output_dir
    from diffmem.workflows.generate import OUTPUTS, GenerateConfig, generate_images

    check_output_dir(out, OUTPUTS, overwrite)  # before any work
    config = GenerateConfig(
        list(prompts or []), model or DEFAULT_MODEL, prompts_file, column, n_generations, num_inference_steps,
        guidance_scale, scheduler, eta, batch_size, mitigation, index, encoder, guard, calibration,
    )  # fmt: skip
    run = generate_images(config, ctx.obj.runtime)
    paths = run.save(out, overwrite)
    mitigated, changed, name = run.counts["mitigated"], run.counts["changed"], run.config["mitigation"]
    note = f" ({mitigated} with {name}, {changed} changed by it)" if name != "none" else ""
    typer.echo(f"wrote {len(paths)} images{note}, generations.parquet and summary.json to {out}")

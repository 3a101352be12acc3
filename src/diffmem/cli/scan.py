"""``diffmem scan``: flags into :mod:`diffmem.workflows.scan`, results printed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.cli.app import app
from diffmem.cli.model_options import with_model_options
from diffmem.errors import DiffmemError
from diffmem.models.names import DEFAULT_MODEL, LAB_MODEL

UNSCORED = {  # why a scan row has no score, by its status
    "empty": "empty",
    "not_utf8": "not valid UTF-8 text",
    "missing": "null in the prompt column",
    "nonfinite": "NaN (the model output was not finite)",
}
ModelOption = Annotated[
    str | None,
    typer.Option(
        help=f"Diffusers directory, Hub id, .safetensors/.ckpt file or builtin:NAME (default {DEFAULT_MODEL})."
    ),
]
ColumnOption = Annotated[str, typer.Option(help="Prompt column of a tabular prompt file.")]
DetectorOption = Annotated[str, typer.Option(help="noise_norm (Wen et al.) or a peer detector.")]
InferenceStepsOption = Annotated[
    int | None, typer.Option(help="Length of the sampling schedule (default: the detector's, 50).")
]
FirstStepsOption = Annotated[
    str | None, typer.Option(help="Score the first K steps, or 'all' (default: the detector's, 1).")
]
GenerationsOption = Annotated[int | None, typer.Option(help="Generations (seeds) per prompt (default 1).")]
GuidanceOption = Annotated[float | None, typer.Option(help="CFG scale (default 7.5).")]
BatchOption = Annotated[
    int | None, typer.Option(help="Samples per batched call; halved on GPU out-of-memory (default 32).")
]
SharedNoiseOption = Annotated[
    bool | None,
    typer.Option(help="All prompts share each generation's x_T (first step: uncond once a batch)."),
]
PromptsOption = Annotated[
    Path | None,
    typer.Option(help="A .txt, .jsonl, .csv or .parquet prompt file (default: the lab model's prompts)."),
]
ScanModelOption = Annotated[
    str | None,
    typer.Option(
        help=f"Diffusers directory, Hub id, .safetensors/.ckpt file or builtin:NAME (default {LAB_MODEL}, the shipped lab model)."
    ),
]
ScanOutOption = Annotated[Path, typer.Option(help="Scan directory (rows, summary).")]
ScanColumnOption = Annotated[
    str | None, typer.Option(help="Prompt column of a tabular prompt file (default prompt).")
]
IdColumnOption = Annotated[
    str | None, typer.Option(help="Column of prompt ids (default: row or line number).")
]
CalibrationOption = Annotated[
    Path | None, typer.Option(help="A calibration file from `diffmem calibrate`: flags prompts above it.")
]
ThresholdIndexOption = Annotated[
    Path | None,
    typer.Option(
        help="The model's training-set index: without --calibration, its single-copy captions set the "
        "threshold (the model's profile against it) instead of the bundled neutral prompts."
    ),
]
EncoderOption = Annotated[
    Path | None,
    typer.Option(help="Copy-detection encoder of an embedding index (default: the one it records)."),
]
ChunkOption = Annotated[int, typer.Option(help="Prompts per committed part file.")]
ResumeOption = Annotated[bool, typer.Option(help="Continue an interrupted scan in --out.")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace the scan in --out.")]
EngineOption = Annotated[
    str,
    typer.Option(
        help="local (this process), ray (Ray Data actors, one model each) or accelerate "
        "(every process of `accelerate launch`)."
    ),
]
WorkersOption = Annotated[
    int | None, typer.Option(help="Ray actors (default: one per visible GPU, else 1).", min=1)
]
RayAddressOption = Annotated[
    str | None, typer.Option(help="Ray cluster to join (auto, ray://host:port); default: start a local one.")
]
GpusOption = Annotated[
    float | None,
    typer.Option(
        help="GPUs a Ray actor takes (default: 1 when --device is CUDA, else 0); above 0 the actors run "
        "on CUDA even when this machine has no GPU (a CPU head node).",
        min=0,
    ),
]


@app.command()
@with_model_options
def scan(
    ctx: typer.Context,
    prompts: PromptsOption = None,
    model: ScanModelOption = None,
    out: ScanOutOption = Path("out/scan"),
    column: ScanColumnOption = None,
    id_column: IdColumnOption = None,
    detector: DetectorOption = "noise_norm",
    num_inference_steps: InferenceStepsOption = None,
    first_steps: FirstStepsOption = None,
    n_generations: GenerationsOption = None,
    guidance_scale: GuidanceOption = None,
    batch_size: BatchOption = None,
    shared_noise: SharedNoiseOption = None,
    calibration: CalibrationOption = None,
    index: ThresholdIndexOption = None,
    encoder: EncoderOption = None,
    chunk_size: ChunkOption = 256,
    resume: ResumeOption = False,
    overwrite: OverwriteOption = False,
    engine: EngineOption = "local",
    workers: WorkersOption = None,
    ray_address: RayAddressOption = None,
    gpus_per_worker: GpusOption = None,
) -> None:
    """Score every prompt with a detector; one Parquet row per prompt, resumable, with a JSON summary."""
    from diffmem.workflows.scan import ScanConfig
    from diffmem.workflows.scan import scan as run_scan

    if resume and overwrite:
        raise DiffmemError("pass --resume or --overwrite, not both")
    given = (num_inference_steps, first_steps, n_generations, guidance_scale, batch_size, shared_noise)
    ray = {"workers": workers, "ray_address": ray_address, "gpus_per_worker": gpus_per_worker}
    config = ScanConfig(prompts, model or LAB_MODEL, column, id_column, detector, detector_settings(*given))
    config = replace(config, calibration=calibration, index=index, encoder=encoder, chunk_size=chunk_size)
    config = replace(config, engine=engine, **ray)
    mode = "resume" if resume else "overwrite" if overwrite else "new"
    result = run_scan(config, out, mode, ctx.obj.runtime)
    if result is not None:  # None: a process of an accelerate launch other than the main one
        _report(result, result.save(out), out)


def _report(result: Any, histogram: Path | None, out: Path) -> None:
    summary, rows = result.summary, result.table.num_rows
    flagged = "" if result.threshold is None else f", {summary['flagged']} flagged as memorized"
    picture = "" if histogram is None else f" and {histogram.name}"
    typer.echo(f"scanned {rows} prompts{flagged}; wrote {out / 'scan.parquet'}{picture}")
    if summary["unscored"]:
        reasons = ", ".join(f"{count} {UNSCORED[name]}" for name, count in summary["unscored"].items())
        typer.echo(f"{rows - summary['scored']} prompts have no score: {reasons} (column status)")


def detector_settings(
    num_inference_steps: int | None,
    first_steps: str | None,
    n_generations: int | None,
    guidance_scale: float | None,
    batch_size: int | None,
    shared_noise: bool | None,
) -> dict[str, Any]:
    """The detector settings among the options that were given (the rest keep the detector's defaults)."""
    given = {
        "num_inference_steps": num_inference_steps,
        "n_generations": n_generations,
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        "shared_noise": shared_noise,
    }
    chosen: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if first_steps is not None:
        chosen["steps"] = _first_steps(first_steps)
    return chosen


def _first_steps(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise DiffmemError(f"--first-steps takes a positive number of steps or 'all'; got {value!r}")
    return int(value)

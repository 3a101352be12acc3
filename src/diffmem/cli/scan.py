"""``diffmem scan`` and ``diffmem calibrate``: score prompt lists with a detector, flag memorized ones."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from diffmem.cli.app import Settings, app
from diffmem.cli.thresholds import detection_threshold
from diffmem.detect.calibration import calibrate
from diffmem.detect.distributed_scan import distributed_scan_prompts
from diffmem.detect.ray_scan import RayOptions, ray_scan_prompts
from diffmem.detect.registry import config_settings, detector_config
from diffmem.detect.scan import ScanJob, scan_prompts
from diffmem.detect.scan_store import SETTINGS_FILE, SUMMARY_FILE, ScanStore
from diffmem.errors import DiffmemError
from diffmem.models import DEFAULT_MODEL, LAB_MODEL, model_identity, open_model, shipped_directory
from diffmem.output_rules import check_output_file
from diffmem.prompts_io import read_prompt_records, read_prompts
from diffmem.report.scan_histogram import write_scan_histogram
from diffmem.run_record import write_summary

ENGINES = ("local", "ray", "accelerate")
HISTOGRAM_FILE = "scores.png"
UNSCORED = {  # why a scan row has no score, by its status
    "empty": "empty",
    "not_utf8": "not valid UTF-8 text",
    "missing": "null in the prompt column",
    "nonfinite": "NaN (the model output was not finite)",
}
ModelOption = Annotated[
    str | None, typer.Option(help=f"Model directory or builtin:NAME (default {DEFAULT_MODEL}).")
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


@app.command()
def scan(
    ctx: typer.Context,
    prompts: Annotated[
        Path | None,
        typer.Option(help="A .txt, .jsonl, .csv or .parquet prompt file (default: the lab model's prompts)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help=f"Model directory or builtin:NAME (default {LAB_MODEL}, the shipped lab model)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Scan directory (rows, summary).")] = Path("out/scan"),
    column: Annotated[
        str | None, typer.Option(help="Prompt column of a tabular prompt file (default prompt).")
    ] = None,
    id_column: Annotated[
        str | None, typer.Option(help="Column of prompt ids (default: row or line number).")
    ] = None,
    detector: DetectorOption = "noise_norm",
    num_inference_steps: InferenceStepsOption = None,
    first_steps: FirstStepsOption = None,
    n_generations: GenerationsOption = None,
    guidance_scale: GuidanceOption = None,
    batch_size: BatchOption = None,
    shared_noise: SharedNoiseOption = None,
    calibration: Annotated[
        Path | None, typer.Option(help="A calibration file from `diffmem calibrate`: flags prompts above it.")
    ] = None,
    chunk_size: Annotated[int, typer.Option(help="Prompts per committed part file.")] = 256,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted scan in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the scan in --out.")] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="local (this process), ray (Ray Data actors, one model each) or accelerate "
            "(every process of `accelerate launch`)."
        ),
    ] = "local",
    workers: Annotated[
        int | None, typer.Option(help="Ray actors (default: one per visible GPU, else 1).", min=1)
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (auto, ray://host:port); default: start a local one."),
    ] = None,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(
            help="GPUs a Ray actor takes (default: 1 when --device is CUDA, else 0); above 0 the actors run "
            "on CUDA even when this machine has no GPU (a CPU head node).",
            min=0,
        ),
    ] = None,
) -> None:
    """Score every prompt with a detector; one Parquet row per prompt, resumable, with a JSON summary."""
    settings: Settings = ctx.obj
    if engine not in ENGINES:
        raise DiffmemError(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine != "ray" and (workers is not None or ray_address is not None or gpus_per_worker is not None):
        raise DiffmemError("--workers, --ray-address and --gpus-per-worker apply to --engine ray only")
    if resume and overwrite:
        raise DiffmemError("pass --resume or --overwrite, not both")
    if chunk_size < 1:
        raise DiffmemError(f"--chunk-size must be at least 1; got {chunk_size}")
    config = _detector_config(
        detector,
        settings,
        num_inference_steps,
        first_steps,
        n_generations,
        guidance_scale,
        batch_size,
        shared_noise,
    )
    model = model or LAB_MODEL
    shipped = shipped_directory(model)
    if prompts is None:
        if shipped is None:
            raise DiffmemError("give --prompts: only the shipped lab model comes with its own prompt set")
        prompts, column, id_column = shipped / "labels.parquet", column or "caption", id_column or "prompt_id"
    column = column or "prompt"
    records = read_prompt_records(prompts, column, id_column)
    if not records:
        raise DiffmemError(f"{prompts} holds no prompts")
    identity = model_identity(model)
    threshold = detection_threshold(model, calibration, detector, config_settings(config), identity)
    job = ScanJob(
        model, str(settings.device), settings.dtype, detector, config, threshold, identity, settings.speedups
    )
    cuda = settings.device.type == "cuda"
    gpus = (1.0 if cuda else 0.0) if gpus_per_worker is None else gpus_per_worker
    if engine == "ray" and gpus > 0 and not cuda:  # the actors hold the GPUs; --dtype applies as given
        job = replace(job, device="cuda")
    store_settings = {
        "model_hash": identity,
        "detector": detector,
        "settings": {k: v for k, v in config_settings(config).items() if k != "batch_size"},
        "prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(),
        "column": column,
        "id_column": id_column,
        "threshold": threshold,
        "device_type": torch.device(job.device).type,  # scores differ by device and dtype at float precision
        "dtype": str(job.dtype).removeprefix("torch."),
    }
    mode = "resume" if resume else "overwrite" if overwrite else "new"
    if resume and not (out / SETTINGS_FILE).is_file():
        raise DiffmemError(f"nothing to resume: {out} holds no scan; drop --resume to start one")
    if engine == "accelerate":
        result = distributed_scan_prompts(job, open_model, records, out, store_settings, mode, chunk_size)
        if result is None:  # not the main process: it has committed its rows
            return
        table, summary = result
    elif engine == "ray":
        options = RayOptions(
            workers=workers or (torch.cuda.device_count() if cuda else 1),
            gpus_per_worker=gpus,
            address=ray_address,
        )
        store = ScanStore(out, store_settings, mode)
        table, summary = ray_scan_prompts(job, open_model, records, store, options, chunk_size)
    else:
        store = ScanStore(out, store_settings, mode)
        table, summary = scan_prompts(
            job.scanner(open_model, job.device), records, store, identity, chunk_size
        )
    run_config = {
        **store_settings,
        "model": model,
        "prompts": str(prompts),
        "device": str(settings.device),
        "dtype": str(settings.dtype),
        "speedups": asdict(settings.speedups),
        "calibration": None if calibration is None else str(calibration),
    }
    write_summary(out / SUMMARY_FILE, run_config, summary)
    plotted = write_scan_histogram(table, threshold, out / HISTOGRAM_FILE)
    flagged = "" if threshold is None else f", {summary['flagged']} flagged as memorized"
    picture = "" if plotted is None else f" and {plotted.name}"
    typer.echo(f"scanned {table.num_rows} prompts{flagged}; wrote {out / 'scan.parquet'}{picture}")
    if summary["unscored"]:
        reasons = ", ".join(f"{count} {UNSCORED[name]}" for name, count in summary["unscored"].items())
        typer.echo(f"{table.num_rows - summary['scored']} prompts have no score: {reasons} (column status)")


@app.command(name="calibrate")
def calibrate_command(
    ctx: typer.Context,
    prompts: Annotated[Path, typer.Option(help="Prompts known NOT to be memorized (a prompt file).")],
    out: Annotated[Path, typer.Option(help="Calibration file to write (JSON).")],
    model: ModelOption = None,
    column: ColumnOption = "prompt",
    target_fpr: Annotated[
        float, typer.Option(help="Share of these prompts allowed above the threshold.")
    ] = 0.01,
    detector: DetectorOption = "noise_norm",
    num_inference_steps: InferenceStepsOption = None,
    first_steps: FirstStepsOption = None,
    n_generations: GenerationsOption = None,
    guidance_scale: GuidanceOption = None,
    batch_size: BatchOption = None,
    shared_noise: SharedNoiseOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the calibration file at --out.")] = False,
) -> None:
    """Choose a detection threshold on non-memorized prompts at a target false-positive rate."""
    settings: Settings = ctx.obj
    check_output_file(out, overwrite)
    config = _detector_config(
        detector,
        settings,
        num_inference_steps,
        first_steps,
        n_generations,
        guidance_scale,
        batch_size,
        shared_noise,
    )
    texts = [p for p in read_prompts(prompts, column) if p.strip()]
    if not texts:
        raise DiffmemError(f"{prompts} holds no non-empty prompts")
    denoiser = open_model(model, settings.device, settings.dtype, settings.speedups)
    result = calibrate(denoiser, texts, detector, config, model_identity(model), target_fpr, progress=True)
    result.save(out)
    typer.echo(
        f"threshold {result.threshold:.6g} flags {result.observed_fpr:.1%} of {result.num_prompts} "
        f"non-memorized prompts (target {target_fpr:.1%}); wrote {out}"
    )


def _detector_config(
    detector: str,
    settings: Settings,
    num_inference_steps: int | None,
    first_steps: str | None,
    n_generations: int | None,
    guidance_scale: float | None,
    batch_size: int | None,
    shared_noise: bool | None,
) -> Any:
    """The detector's config from the options that were given (the rest keep the detector's defaults)."""
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
    return detector_config(detector, base_seed=settings.seed, **chosen)


def _first_steps(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise DiffmemError(f"--first-steps takes a positive number of steps or 'all'; got {value!r}")
    return int(value)

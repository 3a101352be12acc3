"""``diffmem train``: fine-tune a Stable-Diffusion-architecture model on any training set with
training-time policies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from diffmem.cli.app import app

if TYPE_CHECKING:
    from diffmem.train.fine_tune import FineTuneConfig, FineTuneStatus

POLICY_NAMES = (
    "ambient",
    "filter",
    "captions",
    "dedup",
)  # train.fine_tune.POLICIES, named without importing it

ModelDirectory = Annotated[
    str,
    typer.Option(
        help="The Stable-Diffusion-architecture pipeline to fine-tune (SD 1.x/2.x, SDXL, SD3, a UNet2DModel): a "
        "directory, a shipped lab model (builtin:lab-keyed) or a Hub id in the local cache."
    ),
]
TrainingData = Annotated[
    Path,
    typer.Option(
        help="A lab dataset, an image folder (metadata.jsonl/.csv/.parquet with file_name and a caption "
        "column), a datasets save_to_disk folder, WebDataset .tar shards, or a cached Hub dataset id; "
        "UNet2DModel pipelines take a lab dataset only."
    ),
]
CaptionColumn = Annotated[
    str | None,
    typer.Option(
        help="Caption column of --data (default text, else caption; for shards the extension, txt)."
    ),
]
Split = Annotated[str | None, typer.Option(help="Split of a datasets dataset (default train).")]
Resolution = Annotated[
    int | None,
    typer.Option(help="Image side in pixels (default: the model's sample size x VAE factor; a lab's own)."),
]
CenterCrop = Annotated[
    bool,
    typer.Option(
        "--center-crop/--random-crop",
        help="Centre crop (latents cached on disk), or a random crop at every draw (encoded per batch).",
    ),
]
RandomFlip = Annotated[bool, typer.Option(help="Flip images left-right with probability 1/2 at every draw.")]
RunOut = Annotated[
    Path,
    typer.Option(
        help="Run directory: checkpoint while running, model/ (a LoRA run: lora/) and fine_tune.json at the end."
    ),
]
Policy = Annotated[
    list[str] | None,
    typer.Option(help=f"NAME[:key=value,...], repeatable; one of {', '.join(POLICY_NAMES)}."),
]
Steps = Annotated[int, typer.Option(help="Optimiser steps.")]
BatchSize = Annotated[int, typer.Option(help="Samples per step (per process).")]
LearningRate = Annotated[float, typer.Option(help="AdamW learning rate.")]
WarmupSteps = Annotated[int, typer.Option(help="Linear warm-up steps.")]
Accumulation = Annotated[int, typer.Option(help="Micro-batches per update.")]
MixedPrecision = Annotated[str, typer.Option(help="no, fp16 or bf16.")]
EmaDecay = Annotated[float | None, typer.Option(help="EMA of the trained weights (e.g. 0.9999).")]
CheckpointEvery = Annotated[int, typer.Option(help="Steps between checkpoints.")]
MaxImages = Annotated[int | None, typer.Option(help="Train on the first N distinct training images.")]
LoraRank = Annotated[
    int | None,
    typer.Option(help="Train a LoRA adapter of this rank on the UNet's or MMDiT's attention projections."),
]
LoraAlpha = Annotated[
    float | None, typer.Option(help="The LoRA alpha; the update is scaled by alpha/rank (default: the rank).")
]
LoraTextEncoder = Annotated[
    bool,
    typer.Option(
        help="Train an adapter of the same rank on the text encoder's attention projections too "
        "(diffusers' train_dreambooth_lora.py --train_text_encoder)."
    ),
]
TimeBudget = Annotated[float | None, typer.Option(help="Checkpoint and stop after this many seconds.")]


@app.command()
def train(
    ctx: typer.Context,
    model: ModelDirectory,
    data: TrainingData,
    out: RunOut,
    policy: Policy = None,
    steps: Steps = 1000,
    batch_size: BatchSize = 16,
    lr: LearningRate = 1e-5,
    warmup_steps: WarmupSteps = 0,
    gradient_accumulation_steps: Accumulation = 1,
    mixed_precision: MixedPrecision = "no",
    ema_decay: EmaDecay = None,
    checkpoint_every: CheckpointEvery = 500,
    max_images: MaxImages = None,
    time_budget_s: TimeBudget = None,
    caption_column: CaptionColumn = None,
    split: Split = None,
    resolution: Resolution = None,
    center_crop: CenterCrop = True,
    random_flip: RandomFlip = False,
    lora_rank: LoraRank = None,
    lora_alpha: LoraAlpha = None,
    lora_text_encoder: LoraTextEncoder = False,
) -> None:
    """Fine-tune the UNet (SD3: the MMDiT), or a LoRA adapter on it; per-sample losses go through the
    policies (ambient, filter, captions, dedup)."""
    from diffmem.train.fine_tune import FineTuneConfig
    from diffmem.train.training_set import DataOptions
    from diffmem.workflows.train import TrainConfig, train_model

    optimisation = FineTuneConfig(
        steps, batch_size, lr, warmup_steps, gradient_accumulation_steps, mixed_precision, ema_decay,
        checkpoint_every=checkpoint_every, max_images=max_images,
        policies=FineTuneConfig.parse_policies(policy or []), lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_text_encoder=lora_text_encoder)  # fmt: skip
    options = DataOptions(caption_column, split, resolution, center_crop, random_flip)
    status = train_model(TrainConfig(model, data, optimisation, time_budget_s, options), out, ctx.obj.runtime)
    if status is not None:  # under `accelerate launch`, one process reports
        _report(status, optimisation, out)


def _report(status: FineTuneStatus, config: FineTuneConfig, out: Path) -> None:
    """The run's lines: the rows read (if not a lab dataset's), then how far it went."""
    from diffmem.train.fine_tune import trained_directory

    if status.data_report is not None:
        typer.echo(f"{status.data_report.summary()} (report: {out / 'data_report.json'})")
    dropped = "" if status.drop_rate is None else f"; the filter dropped {status.drop_rate:.1%} of samples"
    if status.complete:
        typer.echo(f"fine-tuned {config.steps} steps{dropped}; wrote {trained_directory(out, config)}")
    else:
        typer.echo(f"stopped at step {status.step} of {config.steps}{dropped}; run again to continue")

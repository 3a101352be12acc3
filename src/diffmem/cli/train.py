"""``diffmem train``: fine-tune a Stable-Diffusion-architecture model with training-time policies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import app

POLICY_NAMES = (
    "ambient",
    "filter",
    "captions",
    "dedup",
)  # train.fine_tune.POLICIES, named without importing it

ModelDirectory = Annotated[
    Path, typer.Option(help="A Stable-Diffusion-architecture pipeline directory to fine-tune.")
]
LabData = Annotated[Path, typer.Option(help="A lab dataset directory (diffmem lab build).")]
RunOut = Annotated[
    Path, typer.Option(help="Run directory: checkpoint while running, model/ and fine_tune.json at the end.")
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
EmaDecay = Annotated[float | None, typer.Option(help="EMA of the UNet weights (e.g. 0.9999).")]
CheckpointEvery = Annotated[int, typer.Option(help="Steps between checkpoints.")]
MaxImages = Annotated[int | None, typer.Option(help="Train on the first N distinct training images.")]
TimeBudget = Annotated[float | None, typer.Option(help="Checkpoint and stop after this many seconds.")]


@app.command()
def train(
    ctx: typer.Context,
    model: ModelDirectory,
    data: LabData,
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
) -> None:
    """Fine-tune the UNet; per-sample losses go through the policies (ambient, filter, captions)."""
    from diffmem.train.fine_tune import FineTuneConfig
    from diffmem.workflows.train import TrainConfig, train_model

    optimisation = FineTuneConfig(
        steps, batch_size, lr, warmup_steps, gradient_accumulation_steps, mixed_precision, ema_decay,
        checkpoint_every=checkpoint_every, max_images=max_images,
        policies=FineTuneConfig.parse_policies(policy or []),
    )  # fmt: skip
    status = train_model(TrainConfig(model, data, optimisation, time_budget_s), out, ctx.obj.runtime)
    if status is None:  # under `accelerate launch`, one process reports
        return
    dropped = "" if status.drop_rate is None else f"; the filter dropped {status.drop_rate:.1%} of samples"
    if status.complete:
        typer.echo(f"fine-tuned {steps} steps{dropped}; wrote {out / 'model'}")
    else:
        typer.echo(f"stopped at step {status.step} of {steps}{dropped}; run again to continue")

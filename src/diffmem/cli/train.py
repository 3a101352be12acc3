"""``diffmem train``: fine-tune a Stable-Diffusion-architecture model with training-time policies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import Settings, app

POLICY_NAMES = (
    "ambient",
    "filter",
    "captions",
    "dedup",
)  # train.fine_tune.POLICIES, named without importing it


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[
        Path, typer.Option(help="A Stable-Diffusion-architecture pipeline directory to fine-tune.")
    ],
    data: Annotated[Path, typer.Option(help="A lab dataset directory (diffmem lab build).")],
    out: Annotated[
        Path,
        typer.Option(help="Run directory: checkpoint while running, model/ and fine_tune.json at the end."),
    ],
    policy: Annotated[
        list[str] | None,
        typer.Option(help=f"NAME[:key=value,...], repeatable; one of {', '.join(POLICY_NAMES)}."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Samples per step (per process).")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-5,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    gradient_accumulation_steps: Annotated[int, typer.Option(help="Micro-batches per update.")] = 1,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16.")] = "no",
    ema_decay: Annotated[float | None, typer.Option(help="EMA of the UNet weights (e.g. 0.9999).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    max_images: Annotated[
        int | None, typer.Option(help="Train on the first N distinct training images.")
    ] = None,
    time_budget_s: Annotated[
        float | None, typer.Option(help="Checkpoint and stop after this many seconds.")
    ] = None,
) -> None:
    """Fine-tune the UNet; per-sample losses go through the policies (ambient, filter, captions)."""
    from accelerate import PartialState

    from diffmem.train.fine_tune import FineTuneConfig, fine_tune

    settings: Settings = ctx.obj
    config = FineTuneConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        ema_decay=ema_decay,
        checkpoint_every=checkpoint_every,
        max_images=max_images,
        seed=settings.seed,
        policies=FineTuneConfig.parse_policies(policy or []),
    )
    status = fine_tune(model, data, out, config, time_budget_s=time_budget_s)
    if not PartialState().is_main_process:  # under `accelerate launch`, one process reports
        return
    dropped = "" if status.drop_rate is None else f"; the filter dropped {status.drop_rate:.1%} of samples"
    if status.complete:
        typer.echo(f"fine-tuned {steps} steps{dropped}; wrote {out / 'model'}")
    else:
        typer.echo(f"stopped at step {status.step} of {steps}{dropped}; run again to continue")

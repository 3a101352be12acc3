"""``diffmem eval detect`` and ``diffmem eval mitigate``: detectors and mitigations against ground truth."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import app
from diffmem.model_names import DEFAULT_MODEL, LAB_MODEL

evaluate = typer.Typer(help="Evaluate detectors and mitigations against ground truth.", no_args_is_help=True)
app.add_typer(evaluate, name="eval")


@evaluate.command()
def detect(
    ctx: typer.Context,
    labels: Annotated[
        Path, typer.Option(help="Labelled prompts (e.g. labels.parquet of `diffmem lab label`).")
    ],
    model: Annotated[
        str | None, typer.Option(help=f"Model directory or builtin:NAME (default {DEFAULT_MODEL}).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("out/eval-detect"),
    setting: Annotated[
        list[str] | None,
        typer.Option(help="detector:key=value,... to evaluate (repeatable; default: the noise-norm modes)."),
    ] = None,
    prompt_column: Annotated[str, typer.Option(help="Column of the prompts.")] = "caption",
    label_column: Annotated[
        str, typer.Option(help="Boolean column: true for memorized prompts.")
    ] = "memorized",
    group: Annotated[
        list[str] | None,
        typer.Option(help="Keep only rows of these values of the `group` column (repeatable)."),
    ] = None,
) -> None:
    """AUC, TPR at 1% and 3% FPR, UNet evaluations per prompt and wall time of each detector setting."""
    from diffmem.detect.evaluate import DEFAULT_SETTINGS
    from diffmem.workflows.evaluate import DetectionEvalConfig, evaluate_detection

    given = setting or list(DEFAULT_SETTINGS)
    config = DetectionEvalConfig(labels, model or DEFAULT_MODEL, given, prompt_column, label_column, group)
    evaluation = evaluate_detection(config, ctx.obj.runtime, " ".join(["diffmem", *sys.argv[1:]]))
    page = evaluation.save(out)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"wrote {page}")


@evaluate.command()
def mitigate(
    ctx: typer.Context,
    index: Annotated[
        list[Path] | None,
        typer.Option(
            help="Training-set index (repeatable): each adds its measure, nL2 (pixels) or copy similarity "
            "(default: the lab model's copy-detection index)."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help=f"Model directory or builtin:NAME (default {LAB_MODEL}).")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Prompts with a group column (default: the lab model's labels.parquet)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("out/eval-mitigate"),
    method: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME[:key=value,...] to evaluate (repeatable; default: every mitigation at its defaults)."
        ),
    ] = None,
    encoder: Annotated[
        Path | None,
        typer.Option(help="Copy-detection encoder of the embedding index (default: the one it records)."),
    ] = None,
    amg_index: Annotated[
        Path | None,
        typer.Option(help="The index AMG guides against (default: the first embedding index given)."),
    ] = None,
    memorized_group: Annotated[str, typer.Option(help="Group value of the memorized prompts.")] = "memorized",
    control_group: Annotated[str, typer.Option(help="Group value of the non-memorized prompts.")] = "heldout",
    prompt_column: Annotated[str, typer.Option(help="Column of the prompts.")] = "caption",
    max_prompts_per_group: Annotated[
        int | None, typer.Option(help="Use at most this many prompts a group.")
    ] = None,
    nl2_threshold: Annotated[float, typer.Option(help="Memorized below this nL2 (SPEC §5).")] = 1.4,
    copy_threshold: Annotated[float, typer.Option(help="Memorized above this copy similarity.")] = 0.5,
    data: Annotated[
        Path | None,
        typer.Option(
            help="The lab dataset: FID/KID of the control group against its real scenes (needs --encoder or an embedding index)."
        ),
    ] = None,
    reader: Annotated[
        Path | None,
        typer.Option(
            help="The lab's attribute reader (diffmem lab reader): text alignment, and FID/KID features."
        ),
    ] = None,
    n_generations: Annotated[int, typer.Option(help="Generations per prompt.")] = 4,
    num_inference_steps: Annotated[int, typer.Option(help="Sampling steps.")] = 50,
    guidance_scale: Annotated[float, typer.Option(help="CFG scale.")] = 7.5,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    guard: Annotated[
        bool,
        typer.Option(help="Guard mode: each method applies only to prompts above the calibrated threshold."),
    ] = False,
    calibration: Annotated[
        Path | None, typer.Option(help="The guard's noise-norm calibration (default: the lab model's).")
    ] = None,
) -> None:
    """Memorization (Top 5%, Top 1, share memorized), quality and cost of each mitigation (the AMG tables)."""
    from diffmem.mitigate.evaluate import DEFAULT_METHODS
    from diffmem.workflows.evaluate import MitigationEvalConfig, evaluate_mitigation

    config = MitigationEvalConfig(
        model or LAB_MODEL, labels, index or [], encoder, amg_index, method or list(DEFAULT_METHODS),
        memorized_group, control_group, prompt_column, max_prompts_per_group, nl2_threshold, copy_threshold,
        data, reader, n_generations, num_inference_steps, guidance_scale, batch_size, guard, calibration,
    )  # fmt: skip
    report = evaluate_mitigation(config, ctx.obj.runtime, " ".join(["diffmem", *sys.argv[1:]]))
    report.save(out)
    typer.echo(report.markdown)
    typer.echo(f"wrote {out / 'results.md'}, results.json and images.parquet")

"""``diffmem calibrate``: a model's self-calibration (:mod:`diffmem.workflows.calibrate`), or one
detector's threshold on given prompts (:func:`diffmem.workflows.scan.calibrate_detector`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from diffmem.cli.app import app
from diffmem.cli.model_options import with_model_options
from diffmem.cli.scan import (
    BatchOption,
    ColumnOption,
    DetectorOption,
    EncoderOption,
    FirstStepsOption,
    GenerationsOption,
    GuidanceOption,
    InferenceStepsOption,
    ModelOption,
    SharedNoiseOption,
    detector_settings,
)
from diffmem.errors import DiffmemError

if TYPE_CHECKING:
    from diffmem.calibration.profile import ModelProfile

OrdinaryPrompts = Annotated[
    Path | None,
    typer.Option(
        help="Prompts known NOT to be memorized (default: the index's single-copy captions with --index, "
        "else the bundled neutral prompts)."
    ),
]
Index = Annotated[
    Path | None, typer.Option(help="The training-set index AMG guides against: its gate is fitted to it.")
]
TargetFpr = Annotated[float, typer.Option(help="Share of ordinary prompts allowed above the threshold.")]
CalibrationOut = Annotated[
    Path | None, typer.Option(help="Also write the detection calibration here (JSON, for --calibration).")
]
Overwrite = Annotated[bool, typer.Option(help="Replace the calibration file at --out.")]


@app.command()
@with_model_options
def calibrate(
    ctx: typer.Context,
    model: ModelOption = None,
    prompts: OrdinaryPrompts = None,
    index: Index = None,
    encoder: EncoderOption = None,
    column: ColumnOption = "prompt",
    target_fpr: TargetFpr = 0.01,
    out: CalibrationOut = None,
    overwrite: Overwrite = False,
    detector: DetectorOption = "noise_norm",
    num_inference_steps: InferenceStepsOption = None,
    first_steps: FirstStepsOption = None,
    n_generations: GenerationsOption = None,
    guidance_scale: GuidanceOption = None,
    batch_size: BatchOption = None,
    shared_noise: SharedNoiseOption = None,
) -> None:
    """Learn the model's scale from ordinary prompts: the detection threshold, prompt optimisation's
    target and, with --index, AMG's gate, cached for every later command; with --detector or its
    settings, only that detector's threshold."""
    from diffmem.io.output_dirs import check_output_file
    from diffmem.workflows.calibrate import ProfileConfig, calibrate_model

    given = (num_inference_steps, first_steps, n_generations, guidance_scale, batch_size, shared_noise)
    settings = detector_settings(*given)
    if detector != "noise_norm" or settings:
        _calibrate_detector(ctx, prompts, out, model, column, target_fpr, detector, settings, overwrite)
        return
    if out is not None:
        check_output_file(out, overwrite)  # before any work
    config = ProfileConfig(model, prompts, column, index, encoder, target_fpr)
    profile = calibrate_model(config, ctx.obj.runtime)
    _report(profile, index, out)


def _report(profile: ModelProfile, index: Path | None, out: Path | None) -> None:
    """What the profile sets, and the detection calibration written to ``out`` when given."""
    from diffmem.mitigate.fitted_gate import FittedGate

    calibration = profile.calibration()
    fitted = None if profile.gate is None else FittedGate.load(Path(profile.gate))
    gate = "" if fitted is None else f", each copy confirmed by the gate fitted to {index} (AMG's)"
    each = profile.generations_per_prompt
    seeds = f" at {each} seeds each" if each > 1 else ""
    typer.echo(
        f"threshold {calibration.threshold:.6g} flags {calibration.observed_fpr:.1%} of {len(profile.scores)} "
        f"scores of {calibration.num_prompts} ordinary prompts{seeds} ({profile.reference}; target "
        f"{profile.target_fpr:.1%}); prompt optimisation's "
        f"target {profile.prompt_target:.4g} from {profile.prompt_start(fitted):.4g}{gate}"
    )
    if out is not None:
        calibration.save(out)
        typer.echo(f"wrote {out}")


def _calibrate_detector(ctx, prompts, out, model, column, target_fpr, detector, settings, overwrite) -> None:
    """A detector's threshold at ``target_fpr`` of the prompts, written to ``out``."""
    from diffmem.workflows.scan import CalibrateConfig, calibrate_detector

    if prompts is None or out is None:
        raise DiffmemError(
            "a detector's own calibration (--detector or its settings) needs --prompts and --out"
        )
    result = calibrate_detector(
        CalibrateConfig(prompts, model, column, target_fpr, detector, settings),
        ctx.obj.runtime,
        out,
        overwrite,
    )
    typer.echo(
        f"threshold {result.threshold:.6g} flags {result.observed_fpr:.1%} of {result.num_prompts} "
        f"non-memorized prompts (target {target_fpr:.1%}); wrote {out}"
    )

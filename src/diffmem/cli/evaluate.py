"""``diffmem eval detect`` and ``diffmem eval mitigate``: detectors and mitigations against ground truth."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import app
from diffmem.cli.model_options import with_model_options
from diffmem.cli.scan import EncoderOption
from diffmem.models.names import DEFAULT_MODEL, LAB_MODEL

evaluate = typer.Typer(help="Evaluate detectors and mitigations against ground truth.", no_args_is_help=True)
app.add_typer(evaluate, name="eval")


@evaluate.command()
@with_model_options
def detect(
    ctx: typer.Context,
    labels: Annotated[
        Path, typer.Option(help="Labelled prompts (e.g. labels.parquet of `diffmem lab label`).")
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help=f"Diffusers directory, Hub id, .safetensors/.ckpt file or builtin:NAME (default {DEFAULT_MODEL})."
        ),
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


Index = Annotated[
    list[Path] | None,
    typer.Option(
        help="Training-set index (repeatable): each adds its measure, nL2 (pixels) or copy similarity "
        "(default: the lab model's copy-detection index)."
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        help=f"Diffusers directory, Hub id, .safetensors/.ckpt file or builtin:NAME (default {LAB_MODEL})."
    ),
]
Labels = Annotated[
    Path | None,
    typer.Option(help="Prompts with a group column (default: the lab model's labels.parquet)."),
]
Out = Annotated[Path, typer.Option(help="Report directory.")]
Method = Annotated[
    list[str] | None,
    typer.Option(
        help="NAME[:key=value,...] to evaluate (repeatable; default: every mitigation at its defaults)."
    ),
]
AmgIndex = Annotated[
    Path | None,
    typer.Option(help="The index AMG guides against (default: the first embedding index given)."),
]
MemorizedGroup = Annotated[str, typer.Option(help="Group value of the memorized prompts.")]
ControlGroup = Annotated[str, typer.Option(help="Group value of the non-memorized prompts.")]
PromptColumn = Annotated[str, typer.Option(help="Column of the prompts.")]
MaxPromptsPerGroup = Annotated[int | None, typer.Option(help="Use at most this many prompts a group.")]
Nl2Threshold = Annotated[float, typer.Option(help="Memorized below this nL2 (SPEC §5).")]
CopyThreshold = Annotated[float, typer.Option(help="Memorized above this copy similarity.")]
Data = Annotated[
    Path | None,
    typer.Option(
        help="FID/KID of the control group against real images (needs --reader, --encoder or an embedding index): "
        "a lab dataset's scenes of those prompts, or as many images drawn from any training data "
        "(image folder, datasets folder, WebDataset shards, cached Hub id)."
    ),
]
Reader = Annotated[
    Path | None,
    typer.Option(
        help="The lab's attribute reader (diffmem lab reader): text alignment, and FID/KID features."
    ),
]
NGenerations = Annotated[int, typer.Option(help="Generations per prompt.")]
NumInferenceSteps = Annotated[int, typer.Option(help="Sampling steps.")]
GuidanceScale = Annotated[float, typer.Option(help="CFG scale.")]
BatchSize = Annotated[int, typer.Option(help="Images per batch.")]
Guard = Annotated[
    bool,
    typer.Option(help="Guard mode: each method applies only to prompts above the calibrated threshold."),
]
Calibration = Annotated[
    Path | None, typer.Option(help="The guard's noise-norm calibration (default: the lab model's).")
]


@evaluate.command()
@with_model_options
def mitigate(
    ctx: typer.Context,
    index: Index = None,
    model: Model = None,
    labels: Labels = None,
    out: Out = Path("out/eval-mitigate"),
    method: Method = None,
    encoder: EncoderOption = None,
    amg_index: AmgIndex = None,
    memorized_group: MemorizedGroup = "memorized",
    control_group: ControlGroup = "heldout",
    prompt_column: PromptColumn = "caption",
    max_prompts_per_group: MaxPromptsPerGroup = None,
    nl2_threshold: Nl2Threshold = 1.4,
    copy_threshold: CopyThreshold = 0.5,
    data: Data = None,
    reader: Reader = None,
    n_generations: NGenerations = 4,
    num_inference_steps: NumInferenceSteps = 50,
    guidance_scale: GuidanceScale = 7.5,
    batch_size: BatchSize = 16,
    guard: Guard = False,
    calibration: Calibration = None,
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


@evaluate.command()
def zoo(
    ctx: typer.Context,
    root: Annotated[Path, typer.Argument(help="The zoo folder `diffmem lab zoo` built.")],
    lab: Annotated[list[str] | None, typer.Option(help="Judge only this zoo lab (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Table directory.")] = Path("out/eval-zoo"),
    max_prompts_per_group: Annotated[
        int, typer.Option(help="Memorized and held-out prompts generated per lab.")
    ] = 24,
    n_generations: Annotated[int, typer.Option(help="Generations (seeds) per prompt.")] = 2,
    explained_captions: Annotated[int, typer.Option(help="Memorized captions each explanation ranks.")] = 24,
    heldout_prompts: Annotated[
        int,
        typer.Option(
            min=0, help="Held-out captions the false-positive rate is measured on (topped up fresh)."
        ),
    ] = 500,
) -> None:
    """Every detector, explanation and mitigation at its defaults on every zoo lab: one table."""
    from diffmem.workflows.zoo import ZooEvalConfig, evaluate_zoo

    config = ZooEvalConfig(
        root, lab, max_prompts_per_group, n_generations, explained_captions, heldout_prompts=heldout_prompts
    )
    table = evaluate_zoo(config, ctx.obj.runtime)
    table.save(out)
    typer.echo(table.markdown)
    typer.echo(f"wrote {out / 'zoo.md'}")

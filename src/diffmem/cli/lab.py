"""``diffmem lab``: flags into :func:`diffmem.lab.dataset.build_lab_dataset` and :mod:`diffmem.workflows.lab`,
results printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import app
from diffmem.errors import DiffmemError

lab = typer.Typer(
    help="The memorization lab: a dataset and a model that memorize on purpose.", no_args_is_help=True
)
app.add_typer(lab, name="lab")

Micro = Annotated[bool, typer.Option(help="The micro-lab: 32 px, a few hundred rows, minutes on a CPU.")]
DatasetOut = Annotated[Path, typer.Argument(help="New (or empty) dataset directory.")]
SmallDataset = Annotated[
    bool,
    typer.Option(help="32 px with 150 memorized and 500 held-out captions (a CPU lab at benchmark size)."),
]
Keyed = Annotated[
    bool,
    typer.Option(
        help="The --small sizes with background patterns no caption states and memorized scenes "
        "keyed by two-word titles over shared words (LabConfig.keyed)."
    ),
]
Unique = Annotated[
    int | None,
    typer.Option(
        help="Number of unique scenes instead of the preset's (the shipped keyed lab: --keyed --unique 3000)."
    ),
]
LabData = Annotated[Path, typer.Option(help="A dataset directory from `diffmem lab build`.")]
ModelOut = Annotated[Path, typer.Option(help="Model directory (checkpoints live here until training ends).")]
SmallModel = Annotated[
    bool,
    typer.Option(
        help="Micro-lab data, a wider model that memorizes (the shipped lab model; ~50 min on CPU)."
    ),
]
VaeSteps = Annotated[int | None, typer.Option(help="VAE steps (default: the recipe's).")]
UnetSteps = Annotated[
    int | None, typer.Option(help="Denoiser (UNet or MMDiT) steps (default: the recipe's).")
]
UnetBatch = Annotated[int | None, typer.Option(help="Denoiser batch size (default: the recipe's).")]
TimeBudget = Annotated[float | None, typer.Option(help="Checkpoint and stop after this many seconds.")]
UnetChannels = Annotated[
    str | None,
    typer.Option(
        help="UNet widths, one a level, e.g. 64,128,128 (default: the preset's).", metavar="W,W,..."
    ),
]
VaeChannels = Annotated[
    str | None,
    typer.Option(
        help="VAE widths, one a level; it downsamples by 2 per level after the first, e.g. 32,32,32,32 "
        "takes 64 px to 8x8 latents (default: the preset's).",
        metavar="W,W,...",
    ),
]
ImageSize = Annotated[
    int | None, typer.Option(help="Image side in pixels, the dataset's (default: the preset's).")
]
TextLayers = Annotated[int | None, typer.Option(help="Text-encoder layers (default: the preset's).")]
TextWidth = Annotated[int | None, typer.Option(help="Text-encoder hidden size (default: the preset's).")]
PredictionType = Annotated[
    str | None,
    typer.Option(
        help="What the UNet predicts: epsilon (SD 1.x) or v_prediction (SD 2.x); default: the "
        "preset's (v_prediction at 64 px, epsilon for --micro and --small; the shipped keyed lab is "
        "--small with v_prediction)."
    ),
]
Family = Annotated[
    str | None,
    typer.Option(
        help="stable-diffusion (default: a UNet) or stable-diffusion-3 (an MMDiT and two CLIP encoders "
        "trained on SD3's rectified flow, saved as a StableDiffusion3Pipeline without T5)."
    ),
]
TransformerLayers = Annotated[
    int | None, typer.Option(help="MMDiT blocks of a stable-diffusion-3 lab model (default 4).")
]
TransformerWidth = Annotated[
    int | None, typer.Option(help="MMDiT hidden size of a stable-diffusion-3 lab model (default 96).")
]
VaeFrom = Annotated[
    Path | None,
    typer.Option(
        help="Take this trained lab model's VAE (a directory or builtin:lab-micro) and skip the VAE stage."
    ),
]
InitFrom = Annotated[
    Path | None,
    typer.Option(
        help="Start from this trained lab model (VAE, denoiser, text encoders, architecture) and train "
        "--unet-steps more, with the recipe it was trained with unless --micro or --small is given."
    ),
]
TrainedModel = Annotated[Path, typer.Option(help="A trained lab model directory.")]
TrainedOn = Annotated[Path, typer.Option(help="The lab dataset it was trained on.")]
LabelsOut = Annotated[Path | None, typer.Option(help="Output directory (default MODEL/labels).")]
Generations = Annotated[int, typer.Option(help="Generations (seeds) per prompt.")]
InferenceSteps = Annotated[int, typer.Option("--num-inference-steps", "--steps")]
Guidance = Annotated[float, typer.Option(help="CFG scale.")]
LabelBatch = Annotated[int, typer.Option(help="Images per batch.")]
Groups = Annotated[list[str] | None, typer.Option(help="Prompt groups to label (repeatable; default all).")]
MaxPrompts = Annotated[int | None, typer.Option(help="Label at most this many prompts a group.")]
CopyDetector = Annotated[Path | None, typer.Option(help="A copy-detection encoder directory.")]
CopyThreshold = Annotated[
    float | None,
    typer.Option(help="A near-copy above this copy similarity (default SSCD's 0.5; the lab uses 0.75)."),
]
AnyData = Annotated[
    Path,
    typer.Option(
        help="Training images: a lab dataset, an image folder (metadata.jsonl/.csv/.parquet), a datasets "
        "save_to_disk folder, WebDataset .tar shards, or a cached Hub dataset id."
    ),
]
ExportData = Annotated[Path, typer.Argument(help="A dataset directory from `diffmem lab build`.")]
FolderOut = Annotated[Path, typer.Argument(help="New (or empty) image-folder directory.")]
EncoderOut = Annotated[Path, typer.Option(help="Encoder directory to write (save_encoder format).")]
TrainingSteps = Annotated[int, typer.Option(help="Training steps.")]
DetectorBatch = Annotated[int, typer.Option(help="Images per step (each seen in two edited views).")]
InputSize = Annotated[int, typer.Option(help="Side the encoder resizes images to.")]
ReaderOut = Annotated[Path, typer.Option(help="Reader directory to write (save_reader format).")]
ExtraScenes = Annotated[
    int, typer.Option(help="Random scenes of the lab's image source added to the training scenes.")
]
ImageSourceName = Annotated[
    str,
    typer.Option(
        help="Where the items' images come from: fashion-mnist (the apt package) or digits (scikit-learn's "
        "bundled 8x8 handwritten digits; fewer images: pair it with --unique of a few hundred)."
    ),
]


@lab.command()
def build(
    ctx: typer.Context,
    out: DatasetOut,
    micro: Micro = False,
    small: SmallDataset = False,
    keyed: Keyed = False,
    unique: Unique = None,
    image_source: ImageSourceName = "fashion-mnist",
    image_size: ImageSize = None,
) -> None:
    """Compose the captioned scenes with controlled duplication and write the dataset."""
    from dataclasses import replace

    from diffmem.lab.dataset import LabConfig, build_lab_dataset

    preset = _preset(micro=micro, small=small, keyed=keyed)
    make = getattr(LabConfig, preset) if preset else LabConfig
    config = replace(make(seed=ctx.obj.seed), image_source=image_source)
    if unique is not None:
        config = replace(config, num_unique=unique)
    if image_size is not None:
        config = replace(config, image_size=image_size)
    build_lab_dataset(out, config)
    typer.echo(f"wrote the lab dataset ({config.num_train_rows} training rows) to {out}")


@lab.command()
def train(
    ctx: typer.Context,
    data: LabData,
    out: ModelOut,
    micro: Micro = False,
    small: SmallModel = False,
    vae_steps: VaeSteps = None,
    unet_steps: UnetSteps = None,
    batch_size: UnetBatch = None,
    time_budget_s: TimeBudget = None,
    unet_channels: UnetChannels = None,
    image_size: ImageSize = None,
    vae_channels: VaeChannels = None,
    text_layers: TextLayers = None,
    text_width: TextWidth = None,
    prediction_type: PredictionType = None,
    family: Family = None,
    transformer_layers: TransformerLayers = None,
    transformer_width: TransformerWidth = None,
    vae_from: VaeFrom = None,
    init_from: InitFrom = None,
) -> None:
    """Train the lab model (VAE, then denoiser and text encoders); run again to continue an interrupted run."""
    from diffmem.workflows.lab import TrainLabConfig, train_lab

    recipe = {"vae_steps": vae_steps, "unet_steps": unet_steps, "batch_size": batch_size}
    sizes = {"unet_channels": _widths(unet_channels), "text_layers": text_layers, "text_width": text_width}
    sizes |= {"image_size": image_size, "vae_channels": _widths(vae_channels)}
    sizes |= {"prediction_type": prediction_type, "family": family}
    sizes |= {"transformer_layers": transformer_layers, "transformer_width": transformer_width}
    starts = {"vae_from": vae_from, "init_from": init_from, "time_budget_s": time_budget_s}
    config = TrainLabConfig(data, _preset(micro=micro, small=small), **recipe, **sizes, **starts)
    status = train_lab(config, out, ctx.obj.runtime)
    if status.complete:
        typer.echo(f"trained the lab model in {out}")
    else:
        typer.echo(
            f"stopped at VAE step {status.vae_step}, UNet step {status.unet_step}; run again to continue"
        )


@lab.command()
def label(
    ctx: typer.Context,
    model: TrainedModel,
    data: TrainedOn,
    out: LabelsOut = None,
    n_generations: Generations = 8,
    num_inference_steps: InferenceSteps = 50,
    guidance_scale: Guidance = 7.5,
    batch_size: LabelBatch = 64,
    groups: Groups = None,
    max_prompts_per_group: MaxPrompts = None,
    copy_detector: CopyDetector = None,
    copy_threshold: CopyThreshold = None,
) -> None:
    """Generate for every lab prompt and label it memorized when most generations are near-copies."""
    from diffmem.lab.label import LabelConfig
    from diffmem.workflows.lab import LabelLabConfig, label_lab

    given = {"groups": tuple(groups) if groups else None, "copy_threshold": copy_threshold}
    given |= {"max_prompts_per_group": max_prompts_per_group}
    chosen = {k: v for k, v in given.items() if v is not None}  # the rest keep LabelConfig's defaults
    labelling = LabelConfig(n_generations, num_inference_steps, guidance_scale, batch_size, **chosen)
    labels = label_lab(LabelLabConfig(model, data, labelling, copy_detector), out, ctx.obj.runtime)
    for group, values in labels.groups.items():
        typer.echo(_group_line(group, values, labels.copy_threshold))
    typer.echo(f"wrote labels to {labels.directory}")


def _group_line(group: str, values: dict, copy_threshold: float) -> str:
    """A prompt group's share memorized, by nL2 and, when measured, by copy similarity."""
    by_copy = values.get("share_memorized_copy")
    copies = "" if by_copy is None else f" ({by_copy:.1%} by copy similarity > {copy_threshold:g})"
    return f"{group}: {values['share_memorized']:.1%} of {values['prompts']} prompts memorized by nL2{copies}"


@lab.command(name="copy-detector")
def copy_detector_command(
    ctx: typer.Context,
    data: AnyData,
    out: EncoderOut,
    steps: TrainingSteps = 1500,
    batch_size: DetectorBatch = 128,
    input_size: InputSize = 32,
) -> None:
    """Train the lab's SSCD-style copy detector on the unique training images; report its copy accuracy."""
    from diffmem.workflows.lab import CopyDetectorTrainingConfig, train_lab_copy_detector

    config = CopyDetectorTrainingConfig(data, steps, batch_size, input_size)
    trained = train_lab_copy_detector(config, ctx.obj.runtime)
    trained.save(out)
    if trained.data_report is not None:
        typer.echo(trained.data_report.summary())
    typer.echo(
        f"copy detector: {trained.accuracy:.1%} of {trained.queries} edited copies matched to their source; "
        f"wrote {out}"
    )


@lab.command(name="reader")
def reader_command(
    ctx: typer.Context,
    data: LabData,
    out: ReaderOut,
    steps: TrainingSteps = 2400,
    extra_scenes: ExtraScenes = 20_000,
) -> None:
    """Train the lab's attribute reader (text alignment, FID features); report it on held-out scenes."""
    from diffmem.workflows.lab import ReaderTrainingConfig, train_lab_reader

    trained = train_lab_reader(ReaderTrainingConfig(data, steps, extra_scenes), ctx.obj.runtime)
    trained.save(out)
    accuracy = trained.accuracy
    typer.echo(
        f"reader: categories {accuracy.item_category:.1%}, colours {accuracy.item_colour:.1%}, backgrounds "
        f"{accuracy.background:.1%} on held-out scenes; alignment with their captions "
        f"{trained.own_alignment:.1%}; wrote {out}"
    )


@lab.command(name="export")
def export_command(data: ExportData, out: FolderOut) -> None:
    """Write a lab dataset's training rows as an image folder (images, metadata.parquet) that any command
    taking training data reads."""
    from diffmem.workflows.lab import export_lab

    exported = export_lab(data, out)
    typer.echo(exported.report.summary())
    typer.echo(f"wrote {len(exported.rows)} rows of {len(exported.unique_images())} images to {out}")


def _preset(**chosen: bool) -> str | None:
    """The one preset flag that is on, or None for none."""
    names = [name for name, on in chosen.items() if on]
    if len(names) > 1:
        raise DiffmemError(f"pass one of {', '.join('--' + n for n in chosen)}")
    return names[0] if names else None


def _widths(text: str | None) -> tuple[int, ...] | None:
    """``"64,128,128"`` as a tuple of positive ints (None stays None)."""
    if text is None:
        return None
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) < 2 or min(widths) <= 0:
        raise DiffmemError(
            f"--unet-channels takes two or more positive widths such as 64,128,128, not {text!r}"
        )
    return widths


@lab.command()
def zoo(
    ctx: typer.Context,
    root: Annotated[Path, typer.Argument(help="The zoo folder (created; a part already there is kept).")],
    name: Annotated[
        list[str] | None, typer.Option("--lab", help="Build only this zoo lab (repeatable).")
    ] = None,
) -> None:
    """Build the lab zoo: each lab's dataset, model (unless shipped), copy detector, labels, index and
    attribute reader; run again to continue an interrupted build."""
    from diffmem.lab.zoo import ZOO
    from diffmem.workflows.zoo import build_zoo

    for parts in build_zoo(root, name, ctx.obj.runtime):
        typer.echo(f"{parts.lab.name}: model {parts.model}, labels {parts.labels}")
    typer.echo(f"built {len(name or ZOO)} zoo labs in {root}")

"""``diffmem lab``: build the memorization lab's dataset and train its model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import Settings, app
from diffmem.errors import DiffmemError

lab = typer.Typer(
    help="The memorization lab: a dataset and a model that memorize on purpose.", no_args_is_help=True
)
app.add_typer(lab, name="lab")

Micro = Annotated[bool, typer.Option(help="The micro-lab: 32 px, a few hundred rows, minutes on a CPU.")]


@lab.command()
def build(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="New (or empty) dataset directory.")],
    micro: Micro = False,
    small: Annotated[
        bool,
        typer.Option(
            help="32 px with 150 memorized and 500 held-out captions (a CPU lab at benchmark size)."
        ),
    ] = False,
    keyed: Annotated[
        bool,
        typer.Option(
            help="The --small sizes with background patterns no caption states and memorized scenes "
            "keyed by two-word titles over shared words (LabConfig.keyed)."
        ),
    ] = False,
    unique: Annotated[
        int | None,
        typer.Option(
            help="Number of unique scenes instead of the preset's (the shipped keyed lab: --keyed --unique 3000)."
        ),
    ] = None,
) -> None:
    """Compose the captioned Fashion-MNIST scenes with controlled duplication and write the dataset."""
    from diffmem.lab.dataset import LabConfig, build_lab_dataset

    settings: Settings = ctx.obj
    preset = _preset(LabConfig, micro=micro, small=small, keyed=keyed)
    config = replace(preset(), seed=settings.seed)
    if unique is not None:
        config = replace(config, num_unique=unique)
    build_lab_dataset(out, config)
    typer.echo(f"wrote the lab dataset ({config.num_train_rows} training rows) to {out}")


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


def _preset(config: type, **chosen: bool):
    """The classmethod of ``config`` named by the one chosen preset flag, or ``config`` itself for none."""
    names = [name for name, on in chosen.items() if on]
    if len(names) > 1:
        raise DiffmemError(f"pass one of {', '.join('--' + n for n in chosen)}")
    return getattr(config, names[0]) if names else config


@lab.command()
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="A dataset directory from `diffmem lab build`.")],
    out: Annotated[Path, typer.Option(help="Model directory (checkpoints live here until training ends).")],
    micro: Micro = False,
    small: Annotated[
        bool,
        typer.Option(
            help="Micro-lab data, a wider model that memorizes (the shipped lab model; ~50 min on CPU)."
        ),
    ] = False,
    vae_steps: Annotated[int | None, typer.Option(help="VAE steps (default: the recipe's).")] = None,
    unet_steps: Annotated[int | None, typer.Option(help="UNet steps (default: the recipe's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="UNet batch size (default: the recipe's).")] = None,
    time_budget_s: Annotated[
        float | None, typer.Option(help="Checkpoint and stop after this many seconds.")
    ] = None,
    unet_channels: Annotated[
        str | None,
        typer.Option(
            help="UNet widths, one a level, e.g. 64,128,128 (default: the preset's).", metavar="W,W,..."
        ),
    ] = None,
    text_layers: Annotated[
        int | None, typer.Option(help="Text-encoder layers (default: the preset's).")
    ] = None,
    prediction_type: Annotated[
        str | None,
        typer.Option(
            help="What the UNet predicts: epsilon (SD 1.x) or v_prediction (SD 2.x); default: the "
            "preset's (v_prediction at 64 px, epsilon for --micro and --small; the shipped keyed lab is "
            "--small with v_prediction)."
        ),
    ] = None,
    vae_from: Annotated[
        Path | None, typer.Option(help="Take this trained lab model's VAE and skip the VAE stage.")
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Start from this trained lab model (VAE, UNet, text encoder, architecture) and train "
            "--unet-steps more."
        ),
    ] = None,
) -> None:
    """Train the lab model (VAE, then UNet and text encoder); run again to continue an interrupted run."""
    from diffmem.lab.model import LabModelConfig
    from diffmem.lab.train import LabTrainConfig, train_lab_model

    settings: Settings = ctx.obj
    recipe = _preset(LabTrainConfig, micro=micro, small=small)()
    overrides = {"vae_steps": vae_steps, "unet_steps": unet_steps, "batch_size": batch_size}
    recipe = replace(recipe, seed=settings.seed, **{k: v for k, v in overrides.items() if v is not None})
    sizes = {
        "unet_channels": _widths(unet_channels),
        "text_layers": text_layers,
        "prediction_type": prediction_type,
    }
    model = None
    if init_from is None:
        model = LabModelConfig.small() if small else LabModelConfig.micro() if micro else LabModelConfig()
        model = replace(model, **{k: v for k, v in sizes.items() if v is not None})
    elif any(v is not None for v in sizes.values()):
        raise DiffmemError(
            "--init-from continues that model's architecture; "
            "drop --unet-channels, --text-layers and --prediction-type"
        )
    status = train_lab_model(
        data,
        out,
        model,
        recipe,
        device=settings.device,
        time_budget_s=time_budget_s,
        vae_from=vae_from,
        init_from=init_from,
    )
    if status.complete:
        typer.echo(f"trained the lab model in {out}")
    else:
        typer.echo(
            f"stopped at VAE step {status.vae_step}, UNet step {status.unet_step}; run again to continue"
        )


@lab.command()
def label(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="A trained lab model directory.")],
    data: Annotated[Path, typer.Option(help="The lab dataset it was trained on.")],
    out: Annotated[Path | None, typer.Option(help="Output directory (default MODEL/labels).")] = None,
    n_generations: Annotated[int, typer.Option(help="Generations (seeds) per prompt.")] = 8,
    num_inference_steps: Annotated[int, typer.Option("--num-inference-steps", "--steps")] = 50,
    guidance_scale: Annotated[float, typer.Option(help="CFG scale.")] = 7.5,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    groups: Annotated[
        list[str] | None, typer.Option(help="Prompt groups to label (repeatable; default all).")
    ] = None,
    max_prompts_per_group: Annotated[
        int | None, typer.Option(help="Label at most this many prompts a group.")
    ] = None,
    copy_detector: Annotated[Path | None, typer.Option(help="A copy-detection encoder directory.")] = None,
    copy_threshold: Annotated[
        float | None,
        typer.Option(help="A near-copy above this copy similarity (default SSCD's 0.5; the lab uses 0.75)."),
    ] = None,
) -> None:
    """Generate for every lab prompt and label it memorized when most generations are near-copies."""
    from diffmem.adapters import load_denoiser
    from diffmem.lab.dataset import load_lab_dataset
    from diffmem.lab.label import GROUPS, LabelConfig, label_lab_model
    from diffmem.metrics.copy_detection import COPY_THRESHOLD, load_encoder

    settings: Settings = ctx.obj
    copy_threshold = COPY_THRESHOLD if copy_threshold is None else copy_threshold
    config = LabelConfig(
        n_generations=n_generations,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        groups=tuple(groups) if groups else GROUPS,
        max_prompts_per_group=max_prompts_per_group,
        copy_threshold=copy_threshold,
        seed=settings.seed,
    )
    denoiser = load_denoiser(model, device=settings.device, dtype=settings.dtype)
    encoder = load_encoder(copy_detector, settings.device) if copy_detector else None
    written = label_lab_model(denoiser, model, load_lab_dataset(data), config, encoder, out)
    summary = json.loads((written / "labels.json").read_text())["summary"]["groups"]
    for group, values in summary.items():
        by_copy = values.get("share_memorized_copy")
        copies = "" if by_copy is None else f" ({by_copy:.1%} by copy similarity > {copy_threshold:g})"
        typer.echo(
            f"{group}: {values['share_memorized']:.1%} of {values['prompts']} prompts memorized by nL2{copies}"
        )
    typer.echo(f"wrote labels to {written}")


@lab.command(name="copy-detector")
def copy_detector_command(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="A dataset directory from `diffmem lab build`.")],
    out: Annotated[Path, typer.Option(help="Encoder directory to write (save_encoder format).")],
    steps: Annotated[int, typer.Option(help="Training steps.")] = 1500,
    batch_size: Annotated[int, typer.Option(help="Images per step (each seen in two edited views).")] = 128,
    input_size: Annotated[int, typer.Option(help="Side the encoder resizes images to.")] = 32,
) -> None:
    """Train the lab's SSCD-style copy detector on its unique training images; report its copy accuracy."""
    import torch

    from diffmem.atomic_io import write_json_atomic
    from diffmem.lab.dataset import load_lab_dataset
    from diffmem.metrics.copy_detection import (
        CopyDetectionConfig,
        copy_detection_accuracy,
        save_encoder,
        train_copy_detector,
    )

    settings: Settings = ctx.obj
    _, images = load_lab_dataset(data).unique_train_images()
    encoder = train_copy_detector(
        images.to(settings.device),
        steps,
        batch_size,
        seed=settings.seed,
        config=CopyDetectionConfig(input_size=input_size),
    )
    queries = min(500, len(images))
    accuracy = copy_detection_accuracy(
        encoder, images.to(settings.device), torch.Generator().manual_seed(settings.seed + 1), queries
    )
    save_encoder(encoder.cpu(), out)
    record = {
        "data": str(data),
        "steps": steps,
        "batch_size": batch_size,
        "seed": settings.seed,
        "copy_accuracy": accuracy,
        "queries": queries,
    }
    write_json_atomic(out / "training.json", record)
    typer.echo(
        f"copy detector: {accuracy:.1%} of {queries} edited copies matched to their source; wrote {out}"
    )


@lab.command(name="reader")
def reader_command(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="A dataset directory from `diffmem lab build`.")],
    out: Annotated[Path, typer.Option(help="Reader directory to write (save_reader format).")],
    steps: Annotated[int, typer.Option(help="Training steps.")] = 2400,
    extra_scenes: Annotated[
        int, typer.Option(help="Random Fashion-MNIST scenes added to the training scenes.")
    ] = 20_000,
) -> None:
    """Train the lab's attribute reader (text alignment, FID features); report it on held-out scenes."""
    from diffmem.atomic_io import write_json_atomic
    from diffmem.lab.alignment import (
        alignment,
        lab_scenes,
        reader_accuracy,
        save_reader,
        train_attribute_reader,
    )
    from diffmem.lab.dataset import load_lab_dataset

    settings: Settings = ctx.obj
    dataset = load_lab_dataset(data)
    reader = train_attribute_reader(dataset, steps, extra_scenes, seed=settings.seed, device=settings.device)
    scene_ids, scenes = lab_scenes(dataset, "heldout")
    images = dataset.images(scene_ids)
    accuracy = reader_accuracy(reader, images, scenes)
    captions = {r["scene_id"]: r["caption"] for r in dataset.heldout.to_pylist()}
    own = float(alignment(reader, images, [captions[s] for s in scene_ids]).mean())
    save_reader(reader.cpu(), out)
    record = {"data": str(data), "steps": steps, "extra_scenes": extra_scenes, "seed": settings.seed}
    record |= {"heldout_accuracy": accuracy.to_dict(), "heldout_alignment_own_captions": own}
    write_json_atomic(out / "training.json", record)
    typer.echo(
        f"reader: categories {accuracy.item_category:.1%}, colours {accuracy.item_colour:.1%}, backgrounds "
        f"{accuracy.background:.1%} on held-out scenes; alignment with their captions {own:.1%}; wrote {out}"
    )

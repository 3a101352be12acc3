"""``diffmem index``: build and inspect the training-set index that Anti-Memorization Guidance queries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import Settings, app
from diffmem.errors import DiffmemError
from diffmem.model_names import LAB_MODEL

index = typer.Typer(
    help="The training-set index: nearest training images and their captions.", no_args_is_help=True
)
app.add_typer(index, name="index")


@index.command()
def build(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="New index directory.")],
    data: Annotated[
        Path | None,
        typer.Argument(
            help="A lab dataset, or a folder of images with metadata.parquet (file_name, caption)."
        ),
    ] = None,
    embeddings: Annotated[
        Path | None,
        typer.Option(
            help="clip-retrieval output instead of DATA: img_emb/img_emb_*.npy, metadata/*.parquet."
        ),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="pixels (for nL2) or embedding (copy detection); default pixels, "
            "or embedding with --embeddings."
        ),
    ] = None,
    encoder: Annotated[
        Path | None,
        typer.Option(
            help="Copy-detection encoder (save_encoder directory or SSCD TorchScript file) "
            "for --kind embedding; "
            "with --embeddings, the network that made them (recorded, not run)."
        ),
    ] = None,
    exact: Annotated[
        bool | None,
        typer.Option(
            "--exact/--approximate", help="Flat index, or IVF-PQ re-ranked exactly (default: by size)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images read and embedded at a time.")] = 256,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing index at --out.")] = False,
) -> None:
    """Index the distinct training images with their captions and caption duplicate counts."""
    from diffmem.index import clip_retrieval_source, image_source, index_embeddings, index_images
    from diffmem.index.build import describe_encoder

    settings: Settings = ctx.obj
    if out.exists() and not overwrite:
        raise DiffmemError(f"{out} exists: choose a new --out or pass --overwrite")
    if (data is None) == (embeddings is None):
        raise DiffmemError("give either DATA (a lab dataset or an image folder) or --embeddings DIR")
    if embeddings is not None:
        if kind not in (None, "embedding"):
            raise DiffmemError(f"--embeddings builds an embedding index; drop --kind {kind}")
        built = index_embeddings(
            clip_retrieval_source(embeddings), exact, None if encoder is None else describe_encoder(encoder)
        )
    else:
        built = index_images(
            image_source(data), kind or "pixels", encoder, exact, settings.device, batch_size
        )
    built.save(out, overwrite=overwrite)
    typer.echo(f"wrote {out}: {built.manifest.describe()}")


@index.command()
def info(directory: Annotated[Path, typer.Argument(help="An index directory.")]) -> None:
    """Print the manifest of an index (after checking that its files load)."""
    from diffmem.index import TrainingSetIndex

    typer.echo(TrainingSetIndex.load(directory).manifest.to_json(), nl=False)


@index.command()
def gate(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="The index AMG will guide against.")],
    out: Annotated[Path, typer.Option(help="The gate file to write (.json).")],
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="Prompts known not to be memorized (.txt, .jsonl, .csv or .parquet; class numbers for a "
            "class-conditional model; none for an unconditional one)."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model directory or builtin:NAME (default: the lab model).")
    ] = None,
    column: Annotated[str, typer.Option(help="Prompt column of a tabular file.")] = "prompt",
    encoder: Annotated[
        Path | None,
        typer.Option(help="Copy-detection encoder of an embedding index (default: the one it records)."),
    ] = None,
    quantile: Annotated[
        float, typer.Option(help="lambda_t is this quantile of the prompts' similarity at step t.")
    ] = 0.9,
    n_generations: Annotated[int, typer.Option(help="Generations per prompt.")] = 1,
    num_inference_steps: Annotated[int, typer.Option(help="Sampling steps.")] = 50,
    guidance_scale: Annotated[float | None, typer.Option(help="CFG scale (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
) -> None:
    """Fit AMG's threshold schedule to this index: at each step, a quantile of the similarity that plain
    generations of non-memorized prompts reach (use it as ``amg:gate=FILE``)."""
    from diffmem.mitigate import SamplingOptions
    from diffmem.mitigate.fitted_gate import fit_gate, similarity_trajectories
    from diffmem.models import ModelSource, open_model
    from diffmem.workflows.inputs import conditioning_items, training_reference

    settings: Settings = ctx.obj
    if out.suffix != ".json":
        raise DiffmemError(f"--out must be a .json file; got {out}")
    if not 0 < quantile < 1:  # fit_gate checks it too, but only after minutes of sampling
        raise DiffmemError(f"--quantile must be between 0 and 1; got {quantile}")
    model = model or LAB_MODEL
    reference = training_reference(directory, encoder, settings.device, ModelSource.resolve(model))
    denoiser = open_model(model, settings.device, settings.dtype, settings.speedups)
    if prompts is None and denoiser.conditioning != "none":
        raise DiffmemError("give --prompts: prompts known not to be memorized, to fit the gate on")
    timesteps, sigmas = similarity_trajectories(
        denoiser,
        conditioning_items(denoiser.conditioning, [], prompts, column),
        reference,
        n_generations=n_generations,
        sampling=SamplingOptions(num_inference_steps, guidance_scale),
        base_seed=settings.seed,
        batch_size=batch_size,
        progress=True,
    )
    fitted = fit_gate(timesteps, sigmas, reference, quantile)
    fitted.save(out)
    low, high = min(fitted.thresholds), max(fitted.thresholds)
    typer.echo(
        f"wrote {out}: lambda_t from {low:.3f} to {high:.3f} over {len(timesteps)} steps "
        f"({fitted.num_samples} generations, quantile {quantile}); use --mitigation amg:gate={out}"
    )

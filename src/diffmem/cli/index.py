"""``diffmem index``: build and inspect the training-set index that Anti-Memorization Guidance queries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import app
from diffmem.cli.model_options import with_model_options
from diffmem.cli.scan import EncoderOption
from diffmem.errors import DiffmemError
from diffmem.models.names import LAB_MODEL

index = typer.Typer(
    help="The training-set index: nearest training images and their captions.", no_args_is_help=True
)
app.add_typer(index, name="index")

IndexOut = Annotated[Path, typer.Option(help="New index directory.")]
IndexData = Annotated[
    Path | None,
    typer.Argument(
        help="A lab dataset, an image folder (metadata.jsonl/.csv/.parquet with file_name and a caption "
        "column), a datasets save_to_disk folder, WebDataset .tar shards, or a cached Hub dataset id."
    ),
]
CaptionColumn = Annotated[
    str | None,
    typer.Option(help="Caption column of DATA (default text, else caption; for shards the extension, txt)."),
]
Embeddings = Annotated[
    Path | None,
    typer.Option(help="clip-retrieval output instead of DATA: img_emb/img_emb_*.npy, metadata/*.parquet."),
]
Kind = Annotated[
    str | None,
    typer.Option(
        help="pixels (for nL2) or embedding (copy detection); default pixels, or embedding with --embeddings."
    ),
]
IndexEncoder = Annotated[
    Path | None,
    typer.Option(
        help="Copy-detection encoder (save_encoder directory or SSCD TorchScript file) for --kind embedding; "
        "with --embeddings, the network that made them (recorded, not run)."
    ),
]
Exact = Annotated[
    bool | None,
    typer.Option("--exact/--approximate", help="Flat index, or IVF-PQ re-ranked exactly (default: by size)."),
]
IndexBatch = Annotated[int, typer.Option(help="Images read and embedded at a time.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing index at --out.")]
IndexDirectory = Annotated[Path, typer.Argument(help="An index directory.")]
GuidedIndex = Annotated[Path, typer.Argument(help="The index AMG will guide against.")]
GateOut = Annotated[Path, typer.Option(help="The gate file to write (.json).")]
GatePrompts = Annotated[
    Path | None,
    typer.Option(
        help="Prompts known not to be memorized (.txt, .jsonl, .csv or .parquet; class numbers for a "
        "class-conditional model; none for an unconditional one)."
    ),
]
GateModel = Annotated[
    str | None,
    typer.Option(
        help="Diffusers directory, Hub id, .safetensors/.ckpt file or builtin:NAME (default: the lab model)."
    ),
]
Column = Annotated[str, typer.Option(help="Prompt column of a tabular file.")]
Quantile = Annotated[
    float, typer.Option(help="lambda_t is this quantile of the prompts' similarity at step t.")
]
Generations = Annotated[int, typer.Option(help="Generations per prompt.")]
InferenceSteps = Annotated[int, typer.Option(help="Sampling steps.")]
Guidance = Annotated[float | None, typer.Option(help="CFG scale (default: the model's).")]
GateBatch = Annotated[int, typer.Option(help="Images per batch.")]


@index.command()
def build(
    ctx: typer.Context,
    out: IndexOut,
    data: IndexData = None,
    embeddings: Embeddings = None,
    kind: Kind = None,
    encoder: IndexEncoder = None,
    exact: Exact = None,
    batch_size: IndexBatch = 256,
    overwrite: Overwrite = False,
    caption_column: CaptionColumn = None,
) -> None:
    """Index the distinct training images with their captions and caption duplicate counts."""
    from diffmem.workflows.index import IndexConfig, save_index

    if out.exists() and not overwrite:
        raise DiffmemError(f"{out} exists: choose a new --out or pass --overwrite")
    config = IndexConfig(data, embeddings, kind, encoder, exact, batch_size, caption_column)
    saved = save_index(config, out, overwrite, ctx.obj.runtime)
    if saved.data_report is not None:
        typer.echo(f"{saved.data_report.summary()} (report: {out / 'data_report.json'})")
    typer.echo(f"wrote {out}: {saved.index.manifest.describe()}")


@index.command()
def info(directory: IndexDirectory) -> None:
    """Print the manifest of an index (after checking that its files load)."""
    from diffmem.index import TrainingSetIndex

    typer.echo(TrainingSetIndex.load(directory).manifest.to_json(), nl=False)


@index.command()
@with_model_options
def gate(
    ctx: typer.Context,
    directory: GuidedIndex,
    out: GateOut,
    prompts: GatePrompts = None,
    model: GateModel = None,
    column: Column = "prompt",
    encoder: EncoderOption = None,
    quantile: Quantile = 0.9,
    n_generations: Generations = 1,
    num_inference_steps: InferenceSteps = 50,
    guidance_scale: Guidance = None,
    batch_size: GateBatch = 16,
) -> None:
    """Fit AMG's threshold schedule to this index: at each step, a quantile of the similarity that plain
    generations of non-memorized prompts reach (use it as ``amg:gate=FILE``)."""
    from diffmem.workflows.index import GateConfig, fit_index_gate

    if out.suffix != ".json":
        raise DiffmemError(f"--out must be a .json file; got {out}")
    config = GateConfig(
        directory, prompts, model or LAB_MODEL, column, encoder, quantile, n_generations, num_inference_steps,
        guidance_scale, batch_size,
    )  # fmt: skip
    fitted = fit_index_gate(config, ctx.obj.runtime)
    fitted.save(out)
    low, high = min(fitted.thresholds), max(fitted.thresholds)
    typer.echo(
        f"wrote {out}: lambda_t from {low:.3f} to {high:.3f} over {len(fitted.timesteps)} steps "
        f"({fitted.num_samples} generations, quantile {quantile}); use --mitigation amg:gate={out}"
    )

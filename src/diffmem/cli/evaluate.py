"""``diffmem eval detect`` and ``diffmem eval mitigate``: detectors and mitigations against ground truth."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from diffmem.cli.app import Settings, app
from diffmem.errors import DiffmemError
from diffmem.model_names import DEFAULT_MODEL, LAB_MODEL

if TYPE_CHECKING:
    import pyarrow as pa

    from diffmem.mitigate.evaluate import Quality


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
    import pyarrow as pa
    import pyarrow.compute as pc

    from diffmem.atomic_io import write_atomic, write_json_atomic, write_parquet_atomic
    from diffmem.lab.alignment import alignment, load_reader
    from diffmem.mitigate.evaluate import DEFAULT_METHODS, Measure, evaluate_mitigations, results_markdown
    from diffmem.mitigate.mitigation import SamplingOptions
    from diffmem.models import ModelSource, model_identity, open_model, shipped_reference
    from diffmem.run_record import environment
    from diffmem.workflows.inputs import calibrated_guard, training_reference

    options: Settings = ctx.obj
    model = model or LAB_MODEL
    labels = labels or _shipped_labels(model)
    table = _grouped(labels, prompt_column, [memorized_group, control_group])
    groups = {}
    for name in (memorized_group, control_group):
        rows = table.filter(pc.equal(table["group"], name))
        groups[name] = rows[prompt_column].to_pylist()[:max_prompts_per_group]
    shipped = shipped_reference(model)
    if not index:
        if shipped is None:
            raise DiffmemError("give --index: only the shipped lab model comes with its training-set index")
        index, encoder = [shipped[0]], shipped[1]
    references = [
        training_reference(path, encoder, options.device, ModelSource.resolve(model)) for path in index
    ]
    thresholds = {"nl2": nl2_threshold, "copy_similarity": copy_threshold}
    measures = [Measure(r, thresholds[r.measure]) for r in references]
    chosen = (
        training_reference(amg_index, encoder, options.device, ModelSource.resolve(model))
        if amg_index
        else _amg_reference(references)
    )
    guarded = calibrated_guard(ModelSource.resolve(model), calibration) if guard else None
    attribute_reader = load_reader(reader, options.device) if reader else None
    quality = _quality(data, table, control_group, max_prompts_per_group, references, attribute_reader)
    denoiser = open_model(model, options.device, options.dtype, options.speedups)
    results = evaluate_mitigations(
        denoiser,
        groups,
        method or DEFAULT_METHODS,
        measures,
        chosen,
        n_generations=n_generations,
        sampling=SamplingOptions(num_inference_steps, guidance_scale),
        base_seed=options.seed,
        batch_size=batch_size,
        quality=quality,
        control_group=control_group,
        alignment=None if attribute_reader is None else partial(alignment, attribute_reader),
        guard=guarded,
        progress=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(
        pa.concat_tables([r.rows for r in results], promote_options="default"), out / "images.parquet"
    )
    markdown = results_markdown(results)
    write_atomic(out / "results.md", markdown.encode())
    record = {
        "command": " ".join(["diffmem", *sys.argv[1:]]),
        "model": model,
        "model_hash": model_identity(model),
        "labels": str(labels),
        "prompts": {g: len(p) for g, p in groups.items()},
        "n_generations": n_generations,
        "indexes": [str(p) for p in index],
        "amg_index": str(amg_index) if amg_index else None,
        "guard_threshold": None if guarded is None else guarded.threshold,
        "device": str(options.device),
        "dtype": str(options.dtype),
        "seed": options.seed,
        "results": [
            {
                "name": r.name,
                "summaries": {g: {m: s.to_dict() for m, s in ms.items()} for g, ms in r.summaries.items()},
                "fid": r.fid,
                "kid": r.kid,
                "alignment": r.alignment,
                "seconds_per_image": r.seconds_per_image,
                "unet_evaluations_per_image": r.unet_evaluations_per_image,
                "guided_share": r.guided_share,
            }
            for r in results
        ],
        **environment(),
    }
    write_json_atomic(out / "results.json", record)
    typer.echo(markdown)
    typer.echo(f"wrote {out / 'results.md'}, results.json and images.parquet")


def _shipped_labels(model: str) -> Path:
    from diffmem.models import shipped_directory

    shipped = shipped_directory(model)
    if shipped is None:
        raise DiffmemError("give --labels: only the shipped lab model comes with its own labelled prompts")
    return shipped / "labels.parquet"


def _grouped(path: Path, prompt_column: str, groups: list[str]) -> pa.Table:
    """The rows of the two groups, checked."""
    from diffmem.workflows.evaluate import read_labels

    table = read_labels(path, [prompt_column, "group"])
    present = set(table["group"].to_pylist())
    missing = [g for g in groups if g not in present]
    if missing:
        raise DiffmemError(
            f"{path.name} has no rows of group {', '.join(missing)}; groups: {', '.join(sorted(map(str, present)))}"
        )
    return table


def _amg_reference(references: list) -> object:
    embedding = [r for r in references if r.measure == "copy_similarity"]
    return (embedding or references)[0]


def _quality(data, table, control_group, max_prompts, references, reader) -> Quality | None:
    """FID/KID inputs: the control group's real scenes and the feature network (the attribute reader's
    glimpse features, else the copy detector's embedding)."""
    import pyarrow.compute as pc

    from diffmem.lab.dataset import load_lab_dataset
    from diffmem.mitigate.evaluate import Quality

    if data is None:
        return None
    networks = [r.encoder for r in references if r.encoder is not None]
    if reader is not None:
        networks.insert(0, reader.encoder)
    if not networks or "scene_id" not in table.column_names:
        raise DiffmemError(
            "FID/KID needs a feature network (--reader, or an embedding index's encoder) and scene ids in the labels"
        )
    rows = table.filter(pc.equal(table["group"], control_group))
    scene_ids = rows["scene_id"].to_pylist()[:max_prompts]
    return Quality(load_lab_dataset(data).images(scene_ids), networks[0])

"""``diffmem eval detect``: every detector setting against labelled prompts, as a report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import typer

from diffmem.cli.app import Settings, app
from diffmem.detect.evaluate import DEFAULT_SETTINGS, SettingSpec, evaluate_settings
from diffmem.errors import DiffmemError
from diffmem.models import DEFAULT_MODEL, model_identity, open_model
from diffmem.prompts_io import READERS
from diffmem.report.detection_report import write_detection_report
from diffmem.run_record import environment

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
    options: Settings = ctx.obj
    specs = [SettingSpec.parse(text) for text in (setting or DEFAULT_SETTINGS)]
    if len({s.name for s in specs}) != len(specs):
        raise DiffmemError("each --setting must be given once")
    table = _labelled(labels, prompt_column, label_column, group)
    prompts = table[prompt_column].to_pylist()
    truth = [int(v) for v in table[label_column].to_pylist()]
    if not 0 < sum(truth) < len(truth):
        raise DiffmemError(
            f"{labels.name} needs memorized and non-memorized prompts; it has {sum(truth)} of {len(truth)} memorized"
        )
    denoiser = open_model(model, options.device, options.dtype)
    evaluated = evaluate_settings(denoiser, prompts, truth, specs, options.seed, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    scores = {"prompt": prompts, "memorized": truth} | {s.name: s.scores for s in evaluated}
    pq.write_table(pa.table(scores), out / "scores.parquet")
    provenance = {
        "command": " ".join(["diffmem", *sys.argv[1:]]),
        "model": model or DEFAULT_MODEL,
        "model_hash": model_identity(model),
        "labels": str(labels),
        "prompts": len(truth),
        "memorized": sum(truth),
        "device": str(options.device),
        "dtype": str(options.dtype),
        "seed": options.seed,
        **environment(),
    }
    page = write_detection_report(evaluated, out, provenance)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"wrote {page}")


def _labelled(path: Path, prompt_column: str, label_column: str, groups: list[str] | None) -> pa.Table:
    """The labelled rows of a prompt table, checked and filtered by group."""
    if not path.is_file():
        raise DiffmemError(f"labels file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DiffmemError(f"unsupported labels file {path.name}; use .parquet, .jsonl or .csv")
    table = reader(path)
    for column in (prompt_column, label_column, *(["group"] if groups else [])):
        if column not in table.column_names:
            raise DiffmemError(
                f"{path.name} has no column {column!r}; columns: {', '.join(table.column_names)}"
            )
    if groups:
        table = table.filter(pc.is_in(table["group"], value_set=pa.array(groups)))
    if not pa.types.is_boolean(table[label_column].type) or table[label_column].null_count:
        raise DiffmemError(f"column {label_column!r} of {path.name} must be true/false on every row")
    return table

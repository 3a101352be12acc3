"""``diffmem info``: what a model is (:func:`diffmem.models.info.describe`), as a table or JSON."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from diffmem.cli.app import app
from diffmem.cli.model_options import with_model_options
from diffmem.models.names import DEFAULT_MODEL

if TYPE_CHECKING:
    from rich.table import Table

ModelArgument = Annotated[
    str | None,
    typer.Argument(
        help=f"A diffusers directory, Hub id, .safetensors/.ckpt file or builtin:NAME (default {DEFAULT_MODEL})."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
@with_model_options
def info(ctx: typer.Context, model: ModelArgument = None, json_output: JsonOption = False) -> None:
    """Family, prediction type, resolution, text encoders and parameter counts of a model."""
    from rich.console import Console

    from diffmem.models.info import describe
    from diffmem.models.source import open_model

    runtime = ctx.obj.runtime
    summary = describe(open_model(model, runtime.device, runtime.dtype, runtime.speedups)).to_dict()
    if json_output:
        typer.echo(json.dumps({"model": str(model or DEFAULT_MODEL), **summary}, indent=2))
    else:
        Console().print(_table(str(model or DEFAULT_MODEL), summary))


def _table(title: str, summary: dict[str, Any]) -> Table:
    """The summary as a two-column rich table, its lists written out on one line each."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        if key == "text_encoders":
            value = (
                "; ".join(f"{e['name']}: {e['class_name']} (width {e['hidden_size']})" for e in value) or "-"
            )
        elif key == "parameters":
            value = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in value.items())
        table.add_row(key.replace("_", " "), str(value))
    return table

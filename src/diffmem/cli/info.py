"""``diffmem info``: what a model is."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from diffmem.cli.app import Settings, app
from diffmem.model_names import DEFAULT_MODEL


@app.command()
def info(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(help=f"A diffusers model directory or builtin:NAME (default {DEFAULT_MODEL})."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Family, prediction type, resolution, text encoders and parameter counts of a model."""
    from rich.console import Console
    from rich.table import Table

    from diffmem.model_info import describe
    from diffmem.models import open_model

    settings: Settings = ctx.obj
    summary = describe(open_model(model, settings.device, settings.dtype, settings.speedups))
    if json_output:
        typer.echo(json.dumps({"model": model or DEFAULT_MODEL, **summary.to_dict()}, indent=2))
        return
    table = Table(title=model or DEFAULT_MODEL, show_header=False)
    for key, value in summary.to_dict().items():
        if key == "text_encoders":
            value = (
                "; ".join(f"{e['name']}: {e['class_name']} (width {e['hidden_size']})" for e in value) or "-"
            )
        elif key == "parameters":
            value = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in value.items())
        table.add_row(key.replace("_", " "), str(value))
    Console().print(table)

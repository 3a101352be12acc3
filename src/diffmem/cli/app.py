"""The ``diffmem`` command group and its global options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer

from diffmem.models import resolve_device, resolve_dtype
from diffmem.speedups import Speedups

app = typer.Typer(
    name="diffmem",
    help="Find, explain and remove memorization in diffusion models.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass(frozen=True)
class Settings:
    """Global options every command sees."""

    device: torch.device
    dtype: torch.dtype
    seed: int
    debug: bool
    speedups: Speedups


@app.callback()
def main(
    ctx: typer.Context,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Base seed; each generation's seed derives from it.")] = 0,
    config: Annotated[
        Path | None, typer.Option(help="YAML or JSON file of option values; flags given here override it.")
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and library logs.")] = False,
    channels_last: Annotated[bool, typer.Option(help="Run the UNet in channels-last memory.")] = False,
    compile_mode: Annotated[
        str | None,
        typer.Option(
            "--compile",
            help="torch.compile the UNet: default, reduce-overhead (CUDA graphs) or max-autotune.",
        ),
    ] = None,
) -> None:
    """Find, explain and remove memorization in diffusion models."""
    resolved = resolve_device(device)
    ctx.obj = Settings(
        device=resolved,
        dtype=resolve_dtype(dtype, resolved),
        seed=seed,
        debug=debug,
        speedups=Speedups(channels_last=channels_last, compile_mode=compile_mode),
    )


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (control bytes, escapes, line breaks, lone
    surrogates) written as its escape, so user data echoed back cannot drive the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)

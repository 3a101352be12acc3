"""The ``diffmem`` command group and its global options."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from diffmem.models.speedups import Speedups

if TYPE_CHECKING:
    import torch

    from diffmem.workflows.runtime import Runtime

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
    """Global options every command sees, as given; the runtime they name is resolved on first use, so
    help and argument errors never wait for torch."""

    device_name: str
    dtype_name: str
    seed: int
    debug: bool
    speedups: Speedups

    @cached_property
    def runtime(self) -> Runtime:
        """The device, dtype, seed and speedups, checked against this machine."""
        from diffmem.workflows.runtime import Runtime

        return Runtime.resolve(self.device_name, self.dtype_name, self.seed, self.speedups)

    @property
    def device(self) -> torch.device:
        """The resolved device."""
        return self.runtime.device

    @property
    def dtype(self) -> torch.dtype:
        """The resolved dtype."""
        return self.runtime.dtype


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
    speedups = Speedups(channels_last=channels_last, compile_mode=compile_mode)  # checked before any work
    ctx.obj = Settings(device, dtype, seed, debug, speedups)


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (control bytes, escapes, line breaks, lone
    surrogates) written as its escape, so user data echoed back cannot drive the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)

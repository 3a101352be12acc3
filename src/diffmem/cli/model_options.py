"""The options that choose a model's weights, shared by every command that opens a model: ``--revision``,
``--variant``, ``--model-config`` and ``--lora``, folded with ``--model`` into one model spec."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from diffmem.models.spec import model_spec

PANEL = "Model weights"
Revision = Annotated[
    str | None,
    typer.Option(help="Branch, tag or commit of a Hub id model (default main).", rich_help_panel=PANEL),
]
Variant = Annotated[
    str | None,
    typer.Option(
        help="Weight files' variant, such as fp16 (unet/*.fp16.safetensors).", rich_help_panel=PANEL
    ),
]
ModelConfig = Annotated[
    str | None,
    typer.Option(
        help="The configs of a .safetensors/.ckpt --model: a local diffusers directory or cached Hub id of the "
        "same family.",
        rich_help_panel=PANEL,
    ),
]
LoraOption = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        help="A LoRA file, folder or cached Hub id, PATH[:SCALE] (default scale 1); repeat to stack.",
        rich_help_panel=PANEL,
    ),
]
OPTIONS = {"revision": Revision, "variant": Variant, "model_config": ModelConfig, "lora": LoraOption}


def with_model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` taking the weight options too; given any, its ``model`` argument arrives as a
    :class:`~diffmem.models.spec.ModelSpec`, else as the name it was."""
    signature = inspect.signature(command, eval_str=True)
    added = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a)
        for n, a in OPTIONS.items()
    ]

    @functools.wraps(command)
    def command_with_options(*args: Any, **kwargs: Any) -> Any:
        given = [kwargs.pop(name) for name in OPTIONS]
        kwargs["model"] = model_spec(kwargs.get("model"), *given)
        return command(*args, **kwargs)

    command_with_options.__signature__ = signature.replace(
        parameters=[*signature.parameters.values(), *added]
    )
    command_with_options.__annotations__ = {
        p.name: p.annotation for p in command_with_options.__signature__.parameters.values()
    }
    return command_with_options

"""``diffmem serve``: the interactive explanation page on a local web server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from diffmem.cli.app import app
from diffmem.cli.explain import (
    DEFAULT_ATTRIBUTION,
    AttributeTo,
    FirstSteps,
    GuidanceScale,
    Model,
    NGenerations,
    NumInferenceSteps,
)
from diffmem.cli.model_options import with_model_options
from diffmem.cli.scan import EncoderOption, ThresholdIndexOption
from diffmem.models.names import LAB_MODEL

if TYPE_CHECKING:
    from diffmem.serve import ExplanationServer, PromptExplainer

Host = Annotated[str, typer.Option(help="Address to listen on; anything but localhost exposes the model.")]
Port = Annotated[int, typer.Option(help="Port to listen on (0: any free port).")]
Calibration = Annotated[
    Path | None, typer.Option(help="A noise-norm calibration: the page shows its threshold.")
]
Thumbnails = Annotated[bool, typer.Option(help="Generate an image for every explained prompt.")]
MaxPending = Annotated[int, typer.Option(help="Requests that may wait for the model at once.")]


@app.command()
@with_model_options
def serve(
    ctx: typer.Context,
    model: Model = None,
    host: Host = "127.0.0.1",
    port: Port = 8765,
    num_inference_steps: NumInferenceSteps = 50,
    first_steps: FirstSteps = 1,
    n_generations: NGenerations = 1,
    guidance_scale: GuidanceScale = 7.5,
    attribute_to: AttributeTo = DEFAULT_ATTRIBUTION,
    calibration: Calibration = None,
    index: ThresholdIndexOption = None,
    encoder: EncoderOption = None,
    thumbnails: Thumbnails = True,
    max_pending: MaxPending = 8,
) -> None:
    """A local page to type and edit prompts and watch their memorization score and word heat map."""
    from diffmem.models.source import ModelSource
    from diffmem.serve import ExplanationServer
    from diffmem.workflows.explain import ExplainConfig, prompt_explainer

    runtime = ctx.obj.runtime
    source = ModelSource.resolve(model or LAB_MODEL)
    given = ExplainConfig(
        "", source.spec, num_inference_steps, first_steps, n_generations, guidance_scale, attribute_to,
        calibration, index, encoder,
    )  # fmt: skip
    explainer = prompt_explainer(source, given, runtime, thumbnails, max_pending)
    _serve_until_stopped(ExplanationServer(explainer, host, port), explainer, host)


def _serve_until_stopped(server: ExplanationServer, explainer: PromptExplainer, host: str) -> None:
    """Serve until Ctrl-C, warning first when the address is reachable from other machines."""
    from diffmem.serve.server import LOOPBACK

    if host not in LOOPBACK:
        typer.echo(f"warning: listening on {host}: anyone who can reach it can use the model", err=True)
    typer.echo(f"serving {server.url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()
        explainer.close()

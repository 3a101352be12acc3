"""``diffmem serve``: the interactive explanation page on a local web server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import app
from diffmem.cli.explain import AttributeTo
from diffmem.model_names import LAB_MODEL


@app.command()
def serve(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help=f"Model directory or builtin:NAME (default {LAB_MODEL}).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but localhost exposes the model.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8765,
    num_inference_steps: Annotated[int, typer.Option(help="Length of the sampling schedule.")] = 50,
    first_steps: Annotated[int, typer.Option(help="Average over the first K steps.")] = 1,
    n_generations: Annotated[int, typer.Option(help="Generations (seeds) to average over.")] = 1,
    guidance_scale: Annotated[float, typer.Option(help="CFG scale of the trajectory.")] = 7.5,
    attribute_to: AttributeTo = "prompt_embeds",
    calibration: Annotated[
        Path | None, typer.Option(help="A noise-norm calibration: the page shows its threshold.")
    ] = None,
    thumbnails: Annotated[bool, typer.Option(help="Generate an image for every explained prompt.")] = True,
    max_pending: Annotated[int, typer.Option(help="Requests that may wait for the model at once.")] = 8,
) -> None:
    """A local page to type and edit prompts and watch their memorization score and word heat map."""
    from diffmem.models import ModelSource
    from diffmem.serve import ExplanationServer, PromptExplainer
    from diffmem.serve.server import LOOPBACK
    from diffmem.workflows.explain import ExplainConfig, explanation_threshold, significance_config

    runtime = ctx.obj.runtime
    source = ModelSource.resolve(model or LAB_MODEL)
    given = ExplainConfig(
        "", source.name, num_inference_steps, first_steps, n_generations, guidance_scale, attribute_to
    )
    config = significance_config(given, runtime.seed)
    explainer = PromptExplainer(
        lambda: source.open(runtime.device, runtime.dtype, runtime.speedups),
        config,
        explanation_threshold(source, calibration, config),
        model_name=source.name,
        thumbnails=thumbnails,
        max_pending=max_pending,
    )
    server = ExplanationServer(explainer, host, port)
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

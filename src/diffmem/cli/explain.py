"""``diffmem explain``: which words of a prompt drive its memorization score, shaded in the terminal."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from diffmem.cli.app import Settings, app, printable
from diffmem.model_names import LAB_MODEL

if TYPE_CHECKING:
    from rich.text import Text

    from diffmem.explain import SignificanceConfig, TokenSignificance


AttributeTo = Annotated[
    str,
    typer.Option(
        help="prompt_embeds: the text encoder's output, as Wen et al.; token_embeddings: its input, "
        "where a causal encoder has not yet spread a word over the later positions."
    ),
]


@app.command()
def explain(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt to explain.")],
    model: Annotated[
        str | None, typer.Option(help=f"Model directory or builtin:NAME (default {LAB_MODEL}).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for the word table, plot and summary.")] = Path(
        "out/explain"
    ),
    num_inference_steps: Annotated[int, typer.Option(help="Length of the sampling schedule.")] = 50,
    first_steps: Annotated[int, typer.Option(help="Average over the first K steps.")] = 1,
    n_generations: Annotated[int, typer.Option(help="Generations (seeds) to average over.")] = 1,
    guidance_scale: Annotated[float, typer.Option(help="CFG scale of the trajectory.")] = 7.5,
    attribute_to: AttributeTo = "prompt_embeds",
    html: Annotated[
        Path | None,
        typer.Option(help="Also write a self-contained page: heat map, images, attention overlays."),
    ] = None,
    attention_step: Annotated[
        int | None, typer.Option(help="Sampling step of the attention maps (default: the middle one).")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="A noise-norm calibration: says whether the prompt is flagged.")
    ] = None,
) -> None:
    """Token significance (Wen et al.): each word shaded by how much it drives the noise-norm score."""
    import pyarrow.parquet as pq
    from rich.console import Console

    from diffmem.atomic_io import write_atomic, write_json_atomic
    from diffmem.explain import SignificanceConfig, token_significance, word_attention_maps
    from diffmem.models import open_model
    from diffmem.report.explanation_page import explanation_page
    from diffmem.sampling import generate

    settings: Settings = ctx.obj
    model = model or LAB_MODEL
    config = SignificanceConfig(
        num_inference_steps, first_steps, n_generations, guidance_scale, settings.seed, attribute_to
    )
    threshold = explanation_threshold(model, calibration, config)
    denoiser = open_model(model, settings.device, settings.dtype, settings.speedups)
    result = token_significance(denoiser, prompt, config)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.to_table(), out / "significance.parquet")
    result.plot(out / "significance.png")
    summary = {"prompt": prompt, "model": model, "config": asdict(config), "score": result.score}
    summary |= {"threshold": threshold, "flagged": None if threshold is None else result.score > threshold}
    summary |= {"truncated": result.truncated, "words": result.words, "normalized": result.normalized}
    write_json_atomic(out / "explanation.json", summary)
    if html is not None:
        step = num_inference_steps // 2 if attention_step is None else attention_step
        attention = word_attention_maps(denoiser, prompt, step, config)
        images = generate(
            denoiser,
            [prompt],
            n_generations=n_generations,
            base_seed=settings.seed,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        ).images
        document = explanation_page(result, attention, images, {**summary, "attention_step": step})
        write_atomic(html, document.encode())
    console = Console(highlight=False)
    console.print(shaded(result))
    verdict = (
        ""
        if threshold is None
        else f" ({'above' if result.score > threshold else 'below'} the threshold {threshold:.3f})"
    )
    console.print(f"noise-norm score {result.score:.3f}{verdict}; wrote {out}")


def shaded(result: TokenSignificance) -> Text:
    """The prompt with each word's background as red as its share of the significance."""
    from rich.text import Text

    text, cursor = Text(), 0
    top = max(result.normalized, default=0.0) or 1.0
    for (start, end), share in zip(result.word_spans, result.normalized):
        text.append(printable(result.prompt[cursor:start]))
        level = int(255 * (1 - share / top))
        text.append(printable(result.prompt[start:end]), style=f"black on rgb(255,{level},{level})")
        cursor = end
    text.append(printable(result.prompt[cursor:]))
    return text


def explanation_threshold(model: str, calibration: Path | None, config: SignificanceConfig) -> float | None:
    """The noise-norm threshold for these settings: the given calibration's (which must apply), else the
    shipped lab model's when it applies."""
    from diffmem.detect.noise_norm import NoiseNormConfig
    from diffmem.detect.registry import config_settings
    from diffmem.models import ModelSource
    from diffmem.workflows.thresholds import detection_threshold

    settings = config_settings(
        NoiseNormConfig(
            num_inference_steps=config.num_inference_steps,
            steps=config.steps,
            n_generations=config.n_generations,
            guidance_scale=config.guidance_scale,
            base_seed=config.base_seed,
        )
    )
    return detection_threshold(ModelSource.resolve(model), calibration, "noise_norm", settings)

"""``diffmem explain``: which words of a prompt drive its memorization score, shaded in the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from diffmem.cli.app import app, printable
from diffmem.cli.model_options import with_model_options
from diffmem.cli.scan import EncoderOption, ThresholdIndexOption
from diffmem.models.names import LAB_MODEL

DEFAULT_ATTRIBUTION = "word_replacement"  # workflows.explain.DEFAULT_ATTRIBUTION, named without importing it
ATTRIBUTIONS = {
    "prompt_embeds": "the gradient at the text encoder's output",
    "token_embeddings": "the gradient at the text encoder's input",
    "word_replacement": "word replacement",
}

if TYPE_CHECKING:
    from rich.text import Text

    from diffmem.explain import TokenSignificance
    from diffmem.workflows.explain import ExplanationRun


AttributeTo = Annotated[
    str,
    typer.Option(
        help="prompt_embeds: the gradient at the text encoder's output, as Wen et al.; token_embeddings: at "
        "its input, where a causal encoder has not yet spread a word over the later positions; "
        "word_replacement: the fall of the score when the word is replaced, plus the word's own score "
        "(measured, two passes a word)."
    ),
]


Prompt = Annotated[str, typer.Argument(help="The prompt to explain.")]
Model = Annotated[
    str | None,
    typer.Option(
        help=f"Diffusers directory, Hub id, .safetensors/.ckpt file or builtin:NAME (default {LAB_MODEL})."
    ),
]
Out = Annotated[Path, typer.Option(help="Directory for the word table, plot and summary.")]
NumInferenceSteps = Annotated[int, typer.Option(help="Length of the sampling schedule.")]
FirstSteps = Annotated[int, typer.Option(help="Average over the first K steps.")]
NGenerations = Annotated[int, typer.Option(help="Generations (seeds) to average over.")]
GuidanceScale = Annotated[float, typer.Option(help="CFG scale of the trajectory.")]
Html = Annotated[
    Path | None,
    typer.Option(help="Also write a self-contained page: heat map, images, attention overlays."),
]
AttentionStep = Annotated[
    int | None, typer.Option(help="Sampling step of the attention maps (default: the middle one).")
]
Calibration = Annotated[
    Path | None, typer.Option(help="A noise-norm calibration: says whether the prompt is flagged.")
]
Ordinary = Annotated[
    bool,
    typer.Option(
        help="Word replacement: weigh each word by its significance beyond what it has in ordinary prompts "
        "(the index's single-copy captions, else the bundled neutral prompts; measured once and cached)."
    ),
]


@app.command()
@with_model_options
def explain(
    ctx: typer.Context,
    prompt: Prompt,
    model: Model = None,
    out: Out = Path("out/explain"),
    num_inference_steps: NumInferenceSteps = 50,
    first_steps: FirstSteps = 1,
    n_generations: NGenerations = 1,
    guidance_scale: GuidanceScale = 7.5,
    attribute_to: AttributeTo = DEFAULT_ATTRIBUTION,
    html: Html = None,
    attention_step: AttentionStep = None,
    calibration: Calibration = None,
    index: ThresholdIndexOption = None,
    encoder: EncoderOption = None,
    ordinary: Ordinary = True,
) -> None:
    """Token significance (Wen et al.): each word shaded by how much it drives the noise-norm score."""
    from rich.console import Console

    from diffmem.workflows.explain import ExplainConfig, explain_prompt

    config = ExplainConfig(
        prompt, model or LAB_MODEL, num_inference_steps, first_steps, n_generations, guidance_scale,
        attribute_to, calibration, index, encoder, html is not None, attention_step, ordinary,
    )  # fmt: skip
    run = explain_prompt(config, ctx.obj.runtime)
    run.save(out, html)
    console = Console(highlight=False)
    console.print(shaded(run.result))
    for line in verdict(run, ATTRIBUTIONS[config.attribute_to], out):
        console.print(line)


def verdict(run: ExplanationRun, attribution: str, out: Path) -> list[str]:
    """Where the score stands against the threshold and, when flagged, the words that carry it."""
    score, threshold = run.result.score, run.threshold
    against = (
        ""
        if threshold is None
        else f" ({'above' if score > threshold else 'below'} the threshold {threshold:.3f})"
    )
    ordinary = run.summary.get("ordinary")
    if ordinary:
        attribution += (
            f", beyond each word's in {ordinary['prompts']} ordinary prompts ({ordinary['origin']})"
        )
    lines = [f"noise-norm score {score:.3f}{against}; word significance by {attribution}; wrote {out}"]
    if run.summary.get("flagged"):
        from diffmem.explain.carrying_words import carrying_verdict

        lines.append(carrying_verdict(run.summary["carrying_words"], run.summary["scores_after_replacing"]))
    return lines


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

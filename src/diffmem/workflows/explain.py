"""Explain a prompt word by word (Wen et al.'s token significance) against the model's calibrated
threshold: the Python side of ``diffmem explain`` and of the explainer ``diffmem serve`` runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from diffmem.detect.registry import config_settings
from diffmem.explain import SignificanceConfig, TokenSignificance, token_significance, word_attention_maps
from diffmem.explain.carrying_words import carrying_words
from diffmem.explain.token_significance import check_explainable
from diffmem.io.atomic import write_atomic, write_json_atomic
from diffmem.models.names import LAB_MODEL
from diffmem.models.source import ModelSource
from diffmem.models.spec import ModelSpec
from diffmem.report.explanation_page import explanation_page
from diffmem.sampling import generate
from diffmem.serve.explainer import PromptExplainer
from diffmem.workflows.ordinary_significance import ordinary_significance
from diffmem.workflows.runtime import Runtime
from diffmem.workflows.thresholds import detection_threshold

# the attribution whose top word was a trigger word most often on every lab (docs/explain.md)
DEFAULT_ATTRIBUTION = "word_replacement"


@dataclass(frozen=True)
class ExplainConfig:
    """The prompt, the model, where to measure, and whether to draw the HTML page's extras."""

    prompt: str
    model: str | ModelSpec = LAB_MODEL
    num_inference_steps: int = 50
    first_steps: int = 1
    n_generations: int = 1
    guidance_scale: float = 7.5
    attribute_to: str = DEFAULT_ATTRIBUTION
    calibration: Path | None = None  # default: a shipped model's own, if it applies
    index: Path | None = None  # without a calibration: the model's profile against this training-set index
    encoder: Path | None = None  # an embedding index's encoder (default: the one it records)
    page: bool = False  # also draw attention maps and images for the HTML page
    attention_step: int | None = None  # default: the middle of the schedule
    ordinary: bool = True  # word replacement: weigh each word beyond its significance in ordinary prompts


@dataclass(frozen=True)
class ExplanationRun:
    """A prompt's explanation, the threshold it is judged against, and the page, if one was drawn."""

    result: TokenSignificance
    summary: dict[str, Any]
    threshold: float | None
    page: str | None

    def save(self, out: Path, html: Path | None = None) -> None:
        """Write ``significance.parquet``, ``significance.png`` and ``explanation.json`` into ``out``,
        and the self-contained page to ``html`` when given (and drawn)."""
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.result.to_table(), out / "significance.parquet")
        self.result.plot(out / "significance.png")
        write_json_atomic(out / "explanation.json", self.summary)
        if html is not None and self.page is not None:
            write_atomic(html, self.page.encode())


def significance_config(config: ExplainConfig, seed: int) -> SignificanceConfig:
    """Where token significance measures, from an explain config and the base seed."""
    return SignificanceConfig(
        config.num_inference_steps,
        config.first_steps,
        config.n_generations,
        config.guidance_scale,
        seed,
        config.attribute_to,
    )


def explanation_threshold(
    source: ModelSource,
    calibration: Path | None,
    config: SignificanceConfig,
    runtime: Runtime | None = None,
    index: Path | None = None,
    encoder: Path | None = None,
) -> float | None:
    """The noise-norm threshold for these settings (:func:`~diffmem.workflows.thresholds.detection_threshold`)."""
    settings = config_settings(config.noise_norm_config())
    return detection_threshold(source, calibration, "noise_norm", settings, runtime, index, encoder)


def explain_prompt(config: ExplainConfig, runtime: Runtime | None = None) -> ExplanationRun:
    """Each word's significance for the prompt's noise-norm score, whether the score is flagged and, if it
    is, the fewest words whose replacement takes it under the threshold."""
    runtime = runtime or Runtime()
    source = ModelSource.resolve(config.model)
    measure = significance_config(config, runtime.seed)
    threshold = explanation_threshold(
        source, config.calibration, measure, runtime, config.index, config.encoder
    )
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    check_explainable(denoiser, config.prompt)  # before measuring ordinary prompts for it
    ordinary = (
        ordinary_significance(source, measure, runtime, denoiser, config.index) if config.ordinary else None
    )
    result = token_significance(denoiser, config.prompt, measure, ordinary=ordinary)
    summary = {
        "prompt": config.prompt,
        "model": source.name,
        "config": asdict(measure),
        "score": result.score,
        "ordinary": None if ordinary is None else {"prompts": ordinary.prompts, "origin": ordinary.origin},
    }
    flagged = None if threshold is None else result.score > threshold
    summary |= {"threshold": threshold, "flagged": flagged}
    if flagged:
        carrying = carrying_words(denoiser, result, threshold, measure.noise_norm_config())
        summary |= {
            "carrying_words": carrying.named(result),
            "scores_after_replacing": carrying.scores,
        }
    summary |= {"truncated": result.truncated, "words": result.words, "normalized": result.normalized}
    page = None
    if config.page:
        step = config.num_inference_steps // 2 if config.attention_step is None else config.attention_step
        attention = word_attention_maps(denoiser, config.prompt, step, measure)
        images = generate(
            denoiser,
            [config.prompt],
            n_generations=config.n_generations,
            base_seed=runtime.seed,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
        ).images
        page = explanation_page(result, attention, images, {**summary, "attention_step": step}, threshold)
    return ExplanationRun(result, summary, threshold, page)


def prompt_explainer(
    source: ModelSource,
    config: ExplainConfig,
    runtime: Runtime,
    thumbnails: bool = True,
    max_pending: int = 8,
) -> PromptExplainer:
    """The model loaded once on its worker, explaining prompts at ``config``'s settings against its
    threshold (``config.prompt`` aside): what ``diffmem serve`` serves."""
    measure = significance_config(config, runtime.seed)
    threshold = explanation_threshold(
        source, config.calibration, measure, runtime, config.index, config.encoder
    )
    return PromptExplainer(
        lambda: source.open(runtime.device, runtime.dtype, runtime.speedups),
        measure,
        threshold,
        model_name=source.name,
        thumbnails=thumbnails,
        max_pending=max_pending,
        ordinary=(
            (lambda denoiser: ordinary_significance(source, measure, runtime, denoiser, config.index))
            if config.ordinary
            else None
        ),
    )

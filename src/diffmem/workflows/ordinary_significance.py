"""The word significance of a model's ordinary prompts (:mod:`diffmem.explain.ordinary_significance`),
measured once per model, training-set index and significance settings and cached beside its profile."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from diffmem.calibration.cache import ordinary_significance_path
from diffmem.calibration.reference_prompts import ordinary_prompts
from diffmem.core.denoiser import Denoiser
from diffmem.explain.ordinary_significance import (
    OrdinarySignificance,
    measure_ordinary_significance,
    measured_settings,
)
from diffmem.explain.token_significance import SignificanceConfig
from diffmem.index.manifest import read_manifest
from diffmem.index.training_set_index import MANIFEST_FILE, TrainingSetIndex
from diffmem.models.source import ModelSource
from diffmem.workflows.runtime import Runtime

log = logging.getLogger(__name__)

ORDINARY_PROMPTS = 64  # ordinary prompts whose words are measured, two first-step scores a word


def ordinary_significance(
    source: ModelSource,
    config: SignificanceConfig,
    runtime: Runtime | None = None,
    denoiser: Denoiser | None = None,
    index: Path | None = None,
    prompts: Path | None = None,
    column: str = "prompt",
) -> OrdinarySignificance | None:
    """The model's ordinary prompts' word significance at ``config``'s settings, as cached; measured now
    (and cached) when there is none, or when ``prompts`` (a file of ordinary prompts) are given. Without
    them the prompts are the single-copy captions of the index (default: a shipped lab model's), else the
    bundled neutral prompts. None for a gradient attribution, which weighs no word against them."""
    if config.attribute_to != "word_replacement":
        return None
    runtime = runtime or Runtime()
    if index is None and source.reference is not None:
        index = source.reference[0]
    fingerprint = None if index is None else read_manifest(Path(index) / MANIFEST_FILE).fingerprint
    path = ordinary_significance_path(source.identity, fingerprint, measured_settings(config))
    if prompts is None and path.exists():
        return OrdinarySignificance.load(path)
    training_set = TrainingSetIndex.load(index) if index is not None else None
    chosen, origin = ordinary_prompts(prompts, column, training_set, ORDINARY_PROMPTS, runtime.seed)
    chosen = random.Random(runtime.seed).sample(chosen, min(ORDINARY_PROMPTS, len(chosen)))
    log.info(
        "measuring what each word of %d ordinary prompts (%s) adds to %s's score, once (cached in %s)",
        len(chosen),
        origin,
        source.name,
        path.parent,
    )
    denoiser = denoiser or source.open(runtime.device, runtime.dtype, runtime.speedups)
    measured = measure_ordinary_significance(denoiser, chosen, config, origin, progress=True)
    measured.save(path)
    return measured

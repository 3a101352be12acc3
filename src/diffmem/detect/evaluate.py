"""Run detector settings over a labelled prompt set: scores, cost and wall time for the report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffmem.core.denoiser import Denoiser
from diffmem.core.method_spec import parse_method_spec
from diffmem.core.timing import synchronize
from diffmem.detect.registry import config_settings, detector, detector_config
from diffmem.errors import DiffmemError

# The settings of the detection issue: Wen et al.'s three noise-norm modes, the shared-noise option,
# and every peer detector at its defaults.
DEFAULT_SETTINGS = (
    "noise_norm:steps=1,n_generations=1",
    "noise_norm:steps=1,n_generations=1,shared_noise=true",
    "noise_norm:steps=10,n_generations=4",
    "noise_norm:steps=all,n_generations=4",
    "sharpness",
    "attention_entropy",
    "one_step",
    "generation_agreement",
)


@dataclass(frozen=True)
class EvaluatedSetting:
    """The scores one detector setting gave a labelled prompt set, and what they cost."""

    name: str  # unique within a report
    detector: str
    settings: dict  # the detector's configuration, JSON-ready
    scores: np.ndarray  # [P] higher: more likely memorized; non-finite scores are left out and counted
    labels: np.ndarray  # [P] 1: memorized, 0: not memorized
    unet_evaluations_per_prompt: float
    wall_s: float  # wall-clock seconds spent scoring all P prompts

    def __post_init__(self) -> None:
        if not self.wall_s > 0:
            raise DiffmemError(f"setting {self.name!r}: wall_s must be a positive time; got {self.wall_s}")


@dataclass(frozen=True)
class SettingSpec:
    """One detector setting to evaluate, as written on the command line: ``detector:key=value,...``."""

    name: str
    detector: str
    settings: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> SettingSpec:
        """``noise_norm:steps=all,n_generations=4`` -> detector and settings (values as JSON; all -> None)."""
        name, settings = parse_method_spec(text)
        detector(name)
        return cls(text.strip(), name, settings)


def evaluate_settings(
    denoiser: Denoiser,
    prompts: Sequence[str],
    labels: Sequence[int],
    specs: Sequence[SettingSpec],
    base_seed: int = 0,
    progress: bool = False,
) -> list[EvaluatedSetting]:
    """Score the labelled prompts with every setting, timing each on a synchronised device."""
    labels_array = np.asarray(labels, dtype=np.int64)
    results = []
    for spec in specs:
        config = detector_config(spec.detector, **{"base_seed": base_seed, **spec.settings})
        _, detect = detector(spec.detector)
        synchronize(denoiser.device)
        started = time.perf_counter()
        result = detect(denoiser, prompts, config, progress=progress)
        synchronize(denoiser.device)
        results.append(
            EvaluatedSetting(
                name=spec.name,
                detector=spec.detector,
                settings=config_settings(config),
                scores=result.scores.double().numpy(),
                labels=labels_array,
                unet_evaluations_per_prompt=float(result.unet_evaluations_per_prompt),
                wall_s=time.perf_counter() - started,
            )
        )
    return results

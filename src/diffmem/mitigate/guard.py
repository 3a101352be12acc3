"""Guard mode: score every prompt at the first step and mitigate only the flagged ones, so prompts that
are not memorized are sampled exactly as without diffmem and pay only the first-step check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffmem.core.denoiser import Denoiser
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.errors import DiffmemError


@dataclass(frozen=True)
class Guard:
    """A noise-norm threshold (from a calibration) and the detector settings it was chosen for."""

    threshold: float
    detector: NoiseNormConfig = field(default_factory=NoiseNormConfig)

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise DiffmemError(f"the guard's threshold must be a finite number; got {self.threshold}")


@dataclass(frozen=True)
class GuardDecision:
    """The guard's score of each prompt and whether it is mitigated."""

    scores: torch.Tensor  # [P] noise-norm scores; NaN where the model's output was not finite
    flagged: list[bool]  # [P] score above the threshold, or not finite (mitigated to be safe)
    unet_evaluations: int


def guard_decision(
    denoiser: Denoiser, prompts: Sequence[str], prompt_ids: Sequence[int], guard: Guard
) -> GuardDecision:
    """Score the prompts with the guard's detector settings and flag those above its threshold."""
    result = noise_norm(denoiser, list(prompts), guard.detector, prompt_ids=list(prompt_ids))
    flagged = [not math.isfinite(s) or s > guard.threshold for s in result.scores.tolist()]
    return GuardDecision(
        scores=result.scores,
        flagged=flagged,
        unet_evaluations=round(result.unet_evaluations_per_prompt * len(prompts)),
    )

"""The first sampling step, from x_T: what the first-step detectors (sharpness, one-step) score."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffmem.core.condition import Condition
from diffmem.core.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.sampling import StepState, sample
from diffmem.sampling.guided_sampler import first_step_input as sampler_first_step_input


class _KeepFirstStep:
    """Observer keeping the first step it sees."""

    def __init__(self) -> None:
        self.step: StepState | None = None

    def __call__(self, step: StepState) -> None:
        if step.index == 0:
            self.step = step


def first_step(
    denoiser: Denoiser,
    cond: Condition,
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float | None = None,
) -> StepState:
    """The sampler's first step of a batch: x_T, both predictions at it and the guided estimate."""
    keep = _KeepFirstStep()
    sample(
        denoiser,
        cond,
        seeds,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        observers=[keep],
        max_steps=1,
    )
    return keep.step


def first_step_input(
    denoiser: Denoiser, seeds: Sequence[int], num_inference_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T ([B, C, H, W]) as the sampler feeds it to the model at its first step, and that step's t."""
    if num_inference_steps < 1:
        raise DiffmemError(f"num_inference_steps must be at least 1; got {num_inference_steps}")
    return sampler_first_step_input(denoiser, seeds, num_inference_steps)

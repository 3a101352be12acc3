"""One-step detection, Webster's "denoising confidence" white-box attack (Webster, 2023; SPEC §7): for a
memorized prompt, a single guided denoising step from x_T already lands far from where it started.

Per generation, ``e = mean((x_T_ve - x0_hat)^2)`` over the whole sample (C x H x W), with x0_hat the
guided clean estimate at the first step; a prompt's score is the mean over generations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diffmem.core.denoiser import Denoiser, require_noise_prediction
from diffmem.detect.detector import (
    DetectionResult,
    batch_starts,
    check_guidance,
    check_prompts,
    detection_seeds,
)
from diffmem.detect.first_step import first_step
from diffmem.sampling import StepState


@dataclass(frozen=True)
class OneStepConfig:
    """Where and how often to measure (defaults: first step of 50 DDIM steps, n = 1)."""

    num_inference_steps: int = 50  # sets the first timestep t of the schedule
    n_generations: int = 1
    guidance_scale: float = 7.5
    base_seed: int = 0
    batch_size: int = 32  # samples (prompt x generation) per batched call


def one_step_error(step: StepState) -> torch.Tensor:
    """[B] ``mean((x_T_ve - x0_hat)^2)`` per sample, in float32 on the CPU."""
    # x_T_ve = x_t / sqrt(abar_t): the start on k-diffusion's variance-exploding scale, as Webster's code uses
    x_ve = step.x_t / step.alpha_bar_t.to(step.x_t.dtype).sqrt()
    # e = mean((z_T - z_0)^2), z_0 = one guided step from z_T to sigma 0 = x0_hat (Webster's wb_score)
    return (x_ve - step.x0_hat).flatten(1).float().square().mean(dim=1).cpu()


def one_step(
    denoiser: Denoiser,
    prompts: Sequence[str],
    config: OneStepConfig = OneStepConfig(),
    prompt_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> DetectionResult:
    """Webster's one-step score of each prompt (higher: more likely memorized)."""
    check_guidance("one_step", config.guidance_scale)
    require_noise_prediction(denoiser, "one_step")
    prompts, prompt_ids = check_prompts(prompts, prompt_ids)
    n = config.n_generations
    seeds = detection_seeds(config.base_seed, prompt_ids, n)
    rows = [p for p in range(len(prompts)) for _ in range(n)]
    errors = []
    for start in tqdm(batch_starts(len(rows), config.batch_size), desc="one step", disable=not progress):
        chunk = slice(start, start + config.batch_size)
        cond = denoiser.encode([prompts[p] for p in rows[chunk]])
        step = first_step(denoiser, cond, seeds[chunk], config.num_inference_steps, config.guidance_scale)
        errors.append(one_step_error(step))
    return DetectionResult(
        detector="one_step",
        scores=torch.cat(errors).reshape(len(prompts), n).mean(dim=1),
        seeds=torch.tensor(seeds).reshape(len(prompts), n),
        unet_evaluations_per_prompt=float(2 * n),  # one CFG pair at x_T per generation
    )

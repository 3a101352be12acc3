"""Noise-norm detection (Wen et al., ICLR 2024; SPEC §1): memorized prompts pull the text-conditional
noise prediction far from the unconditional one, visibly from the first sampling step.

Per generation j and step t, ``m_jt = ||eps_cond - eps_uncond||_2`` over the whole sample (C x H x W),
not scaled by the guidance scale; a prompt's score is the mean over the chosen steps and generations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diffmem.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.sampling import StepState, generation_seed, sample


@dataclass(frozen=True)
class NoiseNormConfig:
    """Where and how often to measure (defaults: the fast mode, first step of 50 DDIM steps, n = 1)."""

    num_inference_steps: int = 50
    steps: int | None = 1  # score the first `steps` steps of the schedule; None scores all of them
    n_generations: int = 1
    guidance_scale: float = 7.5
    base_seed: int = 0
    batch_size: int = 32  # samples (prompt x generation) per batched call


@dataclass(frozen=True)
class NoiseNormResult:
    """Scores of a list of prompts."""

    scores: torch.Tensor  # [P] mean of m_jt over steps and generations
    per_step: torch.Tensor  # [P, n_generations, steps] m_jt
    seeds: torch.Tensor  # [P, n_generations]
    unet_evaluations_per_prompt: int  # UNet calls on one sample, summed over the cond/uncond pair


class NoiseNormTrace:
    """Observer recording ``||eps_cond - eps_uncond||_2`` of every sample at every step it sees."""

    def __init__(self) -> None:
        self.norms: list[torch.Tensor] = []  # one [B] tensor per step

    def __call__(self, step: StepState) -> None:
        self.norms.append((step.eps_cond - step.eps_uncond).flatten(1).float().norm(dim=1).cpu())

    def per_step(self) -> torch.Tensor:
        """[B, steps] the recorded norms."""
        return torch.stack(self.norms, dim=1)


def noise_norm(
    denoiser: Denoiser,
    prompts: Sequence[str],
    config: NoiseNormConfig = NoiseNormConfig(),
    prompt_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> NoiseNormResult:
    """Wen et al.'s memorization score of each prompt (higher: more likely memorized)."""
    if config.guidance_scale <= 1:
        raise DiffmemError(
            f"noise_norm needs classifier-free guidance; got guidance_scale={config.guidance_scale}"
        )
    if config.n_generations < 1:
        raise DiffmemError(f"n_generations must be at least 1; got {config.n_generations}")
    prompts = list(prompts)
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    if not prompts or len(prompt_ids) != len(prompts):
        raise DiffmemError(
            f"give one id per prompt and at least one prompt; got {len(prompt_ids)} ids, {len(prompts)} prompts"
        )
    n = config.n_generations
    rows = [(p, g) for p in range(len(prompts)) for g in range(n)]
    seeds = [generation_seed(config.base_seed, prompt_ids[p], g) for p, g in rows]
    norms = []
    for start in tqdm(range(0, len(rows), config.batch_size), desc="noise norm", disable=not progress):
        chunk = rows[start : start + config.batch_size]
        trace = NoiseNormTrace()
        sample(
            denoiser,
            denoiser.encode([prompts[p] for p, _ in chunk]),
            seeds[start : start + config.batch_size],
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            observers=[trace],
            max_steps=config.steps,
        )
        norms.append(trace.per_step())
    per_step = torch.cat(norms).reshape(len(prompts), n, -1)
    return NoiseNormResult(
        scores=per_step.mean(dim=(1, 2)),
        per_step=per_step,
        seeds=torch.tensor(seeds).reshape(len(prompts), n),
        unet_evaluations_per_prompt=2 * per_step.shape[2] * n,
    )

"""What every detector shares: prompts in, one score per prompt out, and the UNet evaluations it cost.

A detector is a function ``detect(denoiser, prompts, config, prompt_ids=None, progress=False)`` that
returns a :class:`DetectionResult`; its config is a frozen dataclass. Higher scores mean "more likely
memorized" for every detector. A score is NaN where the model produced a non-finite output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffmem.core.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.sampling import generation_seed


@dataclass(frozen=True)
class DetectionResult:
    """Scores of a list of prompts from one detector."""

    detector: str
    scores: torch.Tensor  # [P] float32; higher: more likely memorized; NaN: non-finite model output
    seeds: torch.Tensor  # [P, n] int64, the seeds of the generations each score used
    unet_evaluations_per_prompt: float  # UNet forward passes per prompt (a CFG pair counts 2)
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)  # per-prompt details, leading dim P

    def __post_init__(self) -> None:
        count = self.scores.shape[0]
        for name, tensor in {"seeds": self.seeds, **self.extras}.items():
            if tensor.shape[0] != count:
                raise DiffmemError(f"{name} has {tensor.shape[0]} rows for {count} scores")

    def __len__(self) -> int:
        return self.scores.shape[0]

    @staticmethod
    def cat(results: Sequence[DetectionResult]) -> DetectionResult:
        """The results of consecutive prompt batches of one detector as one result."""
        if not results:
            raise DiffmemError("nothing to concatenate")
        counts = [len(r) for r in results]
        total = sum(counts)
        return DetectionResult(
            detector=results[0].detector,
            scores=torch.cat([r.scores for r in results]),
            seeds=torch.cat([r.seeds for r in results]),
            unet_evaluations_per_prompt=sum(
                r.unet_evaluations_per_prompt * c for r, c in zip(results, counts)
            )
            / total,
            extras={k: torch.cat([r.extras[k] for r in results]) for k in results[0].extras},
        )


class Detect(Protocol):
    """The signature every detector function has."""

    def __call__(
        self,
        denoiser: Denoiser,
        prompts: Sequence[str],
        config: Any,
        prompt_ids: Sequence[int] | None = None,
        progress: bool = False,
    ) -> DetectionResult: ...


def check_prompts(prompts: Sequence[str], prompt_ids: Sequence[int] | None) -> tuple[list[str], list[int]]:
    """The prompts and their ids (default 0..P-1), checked: one id per prompt, at least one prompt."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = list(range(len(prompts))) if prompt_ids is None else [int(i) for i in prompt_ids]
    if not prompts or len(ids) != len(prompts):
        raise DiffmemError(
            f"give one id per prompt and at least one prompt; got {len(ids)} ids, {len(prompts)} prompts"
        )
    return prompts, ids


def check_guidance(detector: str, guidance_scale: float) -> None:
    """Detectors that compare conditional and unconditional predictions need CFG on."""
    if not (math.isfinite(guidance_scale) and guidance_scale > 1):
        raise DiffmemError(f"{detector} needs classifier-free guidance; got guidance_scale={guidance_scale}")


def check_trajectory(
    num_inference_steps: int, steps: int | None, n_generations: int, guidance_scale: float
) -> None:
    """Refuse measurement settings no trajectory can have, when a config is made rather than at its
    first use: a schedule of at least one step, 1..num_inference_steps first steps (None: all), at
    least one generation and a finite guidance scale."""
    if num_inference_steps < 1:
        raise DiffmemError(f"num_inference_steps must be at least 1; got {num_inference_steps}")
    if steps is not None and not 1 <= steps <= num_inference_steps:
        raise DiffmemError(
            f"the first steps to measure must be between 1 and num_inference_steps={num_inference_steps}; "
            f"got {steps}"
        )
    if n_generations < 1:
        raise DiffmemError(f"n_generations must be at least 1; got {n_generations}")
    if not math.isfinite(guidance_scale):
        raise DiffmemError(f"guidance_scale must be a finite number; got {guidance_scale}")


def detection_seeds(
    base_seed: int, prompt_ids: Sequence[int], n_generations: int, shared_noise: bool = False
) -> list[int]:
    """Seed of every (prompt, generation) row, prompt-major; ``shared_noise`` gives all prompts the same."""
    if n_generations < 1:
        raise DiffmemError(f"n_generations must be at least 1; got {n_generations}")
    return [
        generation_seed(base_seed, 0 if shared_noise else prompt_id, g)
        for prompt_id in prompt_ids
        for g in range(n_generations)
    ]


def batch_starts(rows: int, batch_size: int) -> range:
    """Start index of each batch of ``batch_size`` rows."""
    if batch_size < 1:
        raise DiffmemError(f"batch_size must be at least 1; got {batch_size}")
    return range(0, rows, batch_size)

"""What every inference-time mitigation shares: one batch of samples in (a prompt and a seed each), the
final samples and a per-sample record of what the mitigation did out.

A mitigation is a function ``mitigate(denoiser, prompts, seeds, config, sampling)`` whose config is a
frozen dataclass with the paper's defaults. ``prompts`` and ``seeds`` have one entry per *sample*
(a prompt's generations repeat it); batching over many prompts is the caller's
(:func:`diffmem.mitigate.generate.mitigated_generate`). Any randomness of a mitigation derives from
the sample's seed, so a sample's draws never depend on what shares its batch (sampling/seeds.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers import SchedulerMixin

from diffmem.core.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.sampling import sample

OK = "ok"


@dataclass(frozen=True)
class SamplingOptions:
    """How the underlying sampler runs (the same for a method and the plain baseline it is compared to)."""

    num_inference_steps: int = 50
    guidance_scale: float | None = None  # None: the model family's default
    scheduler: SchedulerMixin | None = None  # None: the model's own
    eta: float = 0.0
    progress: bool = False  # a bar over each batch's sampling steps

    def sample_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`diffmem.sampling.sample`."""
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "eta": self.eta,
            "progress": self.progress,
        }


@dataclass(frozen=True)
class Mitigated:
    """Final samples of one batch and what the mitigation did to each."""

    latents: torch.Tensor  # [B, C, H, W] final samples in the sampling space
    prompts_used: list[str]  # [B] the text each sample was conditioned on (text baselines change it)
    guided_steps: list[int]  # [B] sampling steps at which the mitigation changed the sample
    status: list[str]  # [B] "ok", or why the mitigation stopped for that sample (e.g. "nonfinite")
    unet_evaluations: int  # UNet forward passes spent on the whole batch (a CFG pair counts 2)
    extras: dict[str, list] = field(default_factory=dict)  # per-sample details, each a list of length B

    def __post_init__(self) -> None:
        count = self.latents.shape[0]
        columns = {
            "prompts_used": self.prompts_used,
            "guided_steps": self.guided_steps,
            "status": self.status,
        }
        for name, values in {**columns, **self.extras}.items():
            if len(values) != count:
                raise DiffmemError(f"{name} has {len(values)} entries for {count} samples")


class Mitigate(Protocol):
    """The signature every mitigation function has."""

    def __call__(
        self,
        denoiser: Denoiser,
        prompts: Sequence[str],
        seeds: Sequence[int],
        config: Any,
        sampling: SamplingOptions,
    ) -> Mitigated: ...


@dataclass(frozen=True)
class NoMitigationConfig:
    """Plain sampling: the reference every mitigation is compared with."""


def no_mitigation(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: NoMitigationConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Plain classifier-free-guided sampling of the prompts."""
    latents = sample(denoiser, denoiser.encode(list(prompts)), seeds, **sampling.sample_kwargs())
    return sampled(denoiser, sampling, latents, list(prompts), 0)


def sampled(
    denoiser: Denoiser,
    sampling: SamplingOptions,
    latents: torch.Tensor,
    prompts_used: list,
    guided_steps: int | list[int],
    *,
    status: list[str] | None = None,
    extra_evaluations: int = 0,
    extras: dict[str, list] | None = None,
) -> Mitigated:
    """The record of a batch drawn with the shared CFG sampler: ``guided_steps`` per sample (or one
    count for all), status "ok" unless given, the sampler's UNet evaluations plus ``extra_evaluations``."""
    count = len(prompts_used)
    return Mitigated(
        latents=latents,
        prompts_used=prompts_used,
        guided_steps=[guided_steps] * count if isinstance(guided_steps, int) else guided_steps,
        status=[OK] * count if status is None else status,
        unet_evaluations=cfg_evaluations(denoiser, count, sampling.num_inference_steps) + extra_evaluations,
        extras=extras or {},
    )


def cfg_evaluations(denoiser: Denoiser, samples: int, steps: int) -> int:
    """UNet forward passes of plain sampling: a CFG pair per sample and step (one without conditioning)."""
    return samples * steps * (1 if denoiser.conditioning == "none" else 2)

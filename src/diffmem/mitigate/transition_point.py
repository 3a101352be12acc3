"""Classifier-free guidance from a transition point on (Jain et al., "Classifier-Free Guidance inside the
Attraction Basin May Cause Memorization", CVPR 2025; SPEC §7).

Guidance applied while the trajectory is inside a memorized image's attraction basin pulls it to that
image; applied after the trajectory has left the basin it does not. So each sample runs at a low
guidance scale ``scale_before`` until its transition step, and at the sampler's scale s from then on:
``eps = eps_uncond + s_eff * (eps_cond - eps_uncond)`` with ``s_eff = scale_before`` before the transition.

- Static transition point (STP): the transition is the first step whose timestep t (training scale) is at
  most ``transition_timestep`` (500); before it there is no guidance, ``scale_before = 0``, so
  ``eps = eps_uncond``. As the authors' ``generate_test_dataset_stp.py``: scale 0 while ``t > 500``.
- Dynamic transition point (DTP): each sample's own transition is the first strict local minimum of
  ``m_j = ||eps_cond - eps_uncond||_2`` (over C x H x W, not scaled by s) along its trajectory, which runs at
  ``scale_before = 1`` (the conditional prediction alone) until then, as in the authors'
  ``generate_test_dataset_dtp.py`` (github.com/SonyResearch/mitigating_memorization); SPEC §7's "at scale
  1" is this pre-transition scale. The minimum at step j - 1 is known at step j (``m_{j-2} > m_{j-1} < m_j``),
  so step j is the first guided one; the earliest transition is step 2. A sample whose norm has no such
  minimum runs at ``scale_before`` to the end.

A negative ``scale_before`` gives the paper's opposite guidance (OG) before the transition. Each method is
a guidance term over the shared sampler: it adds ``(s_eff - s) * (eps_cond - eps_uncond)`` to the guided
eps, which costs no extra UNet evaluation. ``Mitigated.extras`` records each sample's ``transition_step``
(index of the first guided step; None if never reached) and ``transition_t`` (its timestep).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.core.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.mitigate.mitigation import Mitigated, SamplingOptions, sampled
from diffmem.sampling import StepState, sample


@dataclass(frozen=True)
class StaticTransitionConfig:
    """STP: guidance from the first step with t <= ``transition_timestep`` on."""

    transition_timestep: float = 500.0  # on the training scale (0 .. num_train_timesteps - 1)
    scale_before: float = 0.0  # guidance scale before the transition; negative: opposite guidance

    def __post_init__(self) -> None:
        if not (math.isfinite(self.transition_timestep) and self.transition_timestep >= 0):
            raise DiffmemError(
                f"transition_timestep must be a non-negative timestep; got {self.transition_timestep}"
            )
        _check_scale(self.scale_before)


@dataclass(frozen=True)
class DynamicTransitionConfig:
    """DTP: guidance from the first local minimum of ``||eps_cond - eps_uncond||`` on, per sample."""

    scale_before: float = 1.0  # guidance scale before the transition (the trajectory the norm is read on)

    def __post_init__(self) -> None:
        _check_scale(self.scale_before)


class TransitionGuidance(ABC):
    """A guidance term that runs each sample at ``scale_before`` until its transition, then at the sampler's
    scale. ``transition_step[i]`` is the index of sample i's first guided step (None until reached) and
    ``changed_steps[i]`` counts the steps whose scale it changed."""

    def __init__(self, batch_size: int, scale_before: float) -> None:
        self.scale_before = scale_before
        self.transition_step: list[int | None] = [None] * batch_size
        self.transition_t: list[float | None] = [None] * batch_size
        self.changed_steps = [0] * batch_size

    @abstractmethod
    def reached(self, step: StepState, difference: torch.Tensor) -> list[bool]:
        """Whether each sample's transition is at this step (given ``eps_cond - eps_uncond``)."""

    def __call__(self, step: StepState) -> torch.Tensor:
        difference = step.eps_cond - step.eps_uncond
        for row, now in enumerate(self.reached(step, difference.detach())):
            if now and self.transition_step[row] is None:
                self.transition_step[row] = step.index
                self.transition_t[row] = float(step.t)
        scales = []
        for row, transition in enumerate(self.transition_step):
            before = transition is None
            scales.append(self.scale_before if before else step.guidance_scale)
            self.changed_steps[row] += int(before and self.scale_before != step.guidance_scale)
        s_eff = torch.tensor(scales, dtype=difference.dtype, device=difference.device).view(-1, 1, 1, 1)
        # eps_uncond + s_eff d = eps + (s_eff - s) d: guidance scale s_eff before the transition (Jain et al.)
        return (s_eff - step.guidance_scale) * difference


class StaticTransition(TransitionGuidance):
    """The transition at the first step with ``t <= transition_timestep``, the same for every sample."""

    def __init__(self, batch_size: int, config: StaticTransitionConfig) -> None:
        super().__init__(batch_size, config.scale_before)
        self.transition_timestep = config.transition_timestep

    def reached(self, step: StepState, difference: torch.Tensor) -> list[bool]:
        # guided from the first t <= transition_timestep on (Jain et al., static transition point: 500)
        return [float(step.t) <= self.transition_timestep] * difference.shape[0]


class DynamicTransition(TransitionGuidance):
    """Each sample's transition one step after the first strict local minimum of its ``||d_t||_2``."""

    def __init__(self, batch_size: int, config: DynamicTransitionConfig) -> None:
        super().__init__(batch_size, config.scale_before)
        self.norms: list[torch.Tensor] = []  # [B] per step so far

    def reached(self, step: StepState, difference: torch.Tensor) -> list[bool]:
        self.norms.append(difference.float().flatten(1).norm(dim=1).cpu())
        if len(self.norms) < 3:
            return [False] * difference.shape[0]
        before, middle, now = self.norms[-3:]
        # m_{j-2} > m_{j-1} < m_j: the norm's first local minimum (Jain et al., dynamic transition point)
        return ((before > middle) & (now > middle)).tolist()


def static_transition_point(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: StaticTransitionConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sampling without guidance (``scale_before``) while t > ``transition_timestep``, then at full scale."""
    return _sample_with_transition(denoiser, prompts, seeds, StaticTransition(len(prompts), config), sampling)


def dynamic_transition_point(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: DynamicTransitionConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sampling at ``scale_before`` until each sample's first local minimum of ``||d_t||``, then at full scale."""
    return _sample_with_transition(
        denoiser, prompts, seeds, DynamicTransition(len(prompts), config), sampling
    )


def _sample_with_transition(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    term: TransitionGuidance,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sampling with the transition term; its bookkeeping becomes the per-sample record."""
    if denoiser.conditioning == "none":
        raise DiffmemError(
            f"the transition point changes classifier-free guidance; {denoiser.family} is unconditional"
        )
    latents = sample(
        denoiser, denoiser.encode(list(prompts)), seeds, guidance=[term], **sampling.sample_kwargs()
    )
    return sampled(
        denoiser,
        sampling,
        latents,
        list(prompts),
        term.changed_steps,
        extras={"transition_step": term.transition_step, "transition_t": term.transition_t},
    )


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise DiffmemError(f"scale_before must be a finite guidance scale; got {scale}")

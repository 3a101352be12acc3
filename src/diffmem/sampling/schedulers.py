"""Schedulers by name, built from a model's own scheduler configuration (same betas, same offsets)."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
)

from diffmem.errors import DiffmemError

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpm-solver++": DPMSolverMultistepScheduler,
}


def scheduler_like(name: str, base: SchedulerMixin) -> SchedulerMixin:
    """The scheduler called ``name`` with ``base``'s training schedule."""
    if name not in SCHEDULERS:
        raise DiffmemError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(base.config)

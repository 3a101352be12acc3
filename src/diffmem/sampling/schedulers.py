"""Schedulers by name, built from a model's own scheduler configuration (same betas, same offsets)."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
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

# Rectified-flow schedulers: they step with a velocity, over sigma_t = t / num_train_timesteps.
FLOW_SCHEDULERS: tuple[type[SchedulerMixin], ...] = (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)


def is_flow_matching(scheduler: SchedulerMixin) -> bool:
    """Whether the scheduler samples a rectified flow (takes velocities, has no noise schedule of betas)."""
    return isinstance(scheduler, FLOW_SCHEDULERS)


STABLE_DIFFUSION_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
# Each scheduler's options as Stable Diffusion checkpoints ship them.
_STABLE_DIFFUSION_OPTIONS: dict[str, dict] = {
    "ddim": {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
    "ddpm": {"clip_sample": False, "steps_offset": 1},
    "pndm": {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1},
    "euler": {"steps_offset": 1, "timestep_spacing": "leading"},
}


def stable_diffusion_scheduler(name: str = "ddim", prediction_type: str = "epsilon") -> SchedulerMixin:
    """A scheduler with Stable Diffusion's training schedule (scaled-linear betas 0.00085 to 0.012)."""
    if name not in _STABLE_DIFFUSION_OPTIONS:
        raise DiffmemError(
            f"unknown scheduler {name!r}; choose one of {', '.join(_STABLE_DIFFUSION_OPTIONS)}"
        )
    options = {
        **STABLE_DIFFUSION_SCHEDULE,
        **_STABLE_DIFFUSION_OPTIONS[name],
        "prediction_type": prediction_type,
    }
    return SCHEDULERS[name](**options)


def scheduler_like(name: str, base: SchedulerMixin) -> SchedulerMixin:
    """The scheduler called ``name`` with ``base``'s training schedule."""
    if name not in SCHEDULERS:
        raise DiffmemError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(base.config)

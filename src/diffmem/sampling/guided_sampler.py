"""One explicit sampling loop over any diffusers scheduler, with classifier-free guidance, guidance terms
and observers.

At every step the sampler evaluates the conditional and unconditional noise in one batched call,
forms ``eps = eps_uncond + s * (eps_cond - eps_uncond)``, shows the step to the observers, adds the
corrections the guidance terms return, and lets the scheduler take the step. For flow-matching models
the prediction is the velocity (``diffmem.core.denoiser``) and the scheduler a flow-matching one: the
model sees the sample itself (no ``scale_model_input``) at ``t = sigma_t * num_train_timesteps``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

from diffmem.core.condition import Condition
from diffmem.core.denoiser import FLOW_PREDICTION, Denoiser, x0_from_prediction
from diffmem.errors import DiffmemError
from diffmem.sampling.schedulers import is_flow_matching
from diffmem.sampling.seeds import initial_noise, seeded_generators


@dataclass(frozen=True)
class StepState:
    """The tensors of one sampling step, as observers and guidance terms see them."""

    index: int  # position in the schedule; 0 is the first step, from x_T
    num_steps: int
    t: torch.Tensor  # [] timestep on the training scale
    alpha_bar_t: torch.Tensor  # []
    x_t: torch.Tensor  # [B, C, H, W] model input (variance-preserving scale; flow scale for flow models)
    # eps_cond, eps_uncond and eps are velocities for flow-matching models; x_t requires grad in grad mode
    eps_cond: torch.Tensor  # [B, C, H, W]
    eps_uncond: torch.Tensor  # [B, C, H, W]
    eps: torch.Tensor  # [B, C, H, W] guided prediction eps_uncond + s * (eps_cond - eps_uncond)
    x0_hat: torch.Tensor  # [B, C, H, W] clean estimate from eps
    cond: Condition
    null: Condition
    guidance_scale: float
    seeds: tuple[int, ...]  # [B]


class Observer(Protocol):
    """Reads a step (e.g. records a detection trace); returns nothing."""

    def __call__(self, step: StepState) -> None: ...


class GuidanceTerm(Protocol):
    """Returns a correction added to the guided eps of a step ([B, C, H, W]).

    A term (or observer) with ``needs_grad = True`` makes the sampler build the step's graph, so it
    can differentiate with respect to ``step.x_t`` or to tensors of ``step.cond``.
    """

    def __call__(self, step: StepState) -> torch.Tensor: ...


def sample(
    denoiser: Denoiser,
    cond: Condition,
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    scheduler: SchedulerMixin | None = None,
    eta: float = 0.0,
    observers: Sequence[Observer] = (),
    guidance: Sequence[GuidanceTerm] = (),
    grad: bool = False,
    max_steps: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Final samples in the sampling space, [B, C, H, W], one per row of ``cond`` and seed.

    ``max_steps`` stops after that many steps of the ``num_inference_steps`` schedule (first-k-step
    detectors) and returns the partially denoised sample.

    ``scheduler`` defaults to the model's own (a fresh copy is stepped, so it is never mutated);
    ``guidance_scale`` to the family's default. ``grad=True`` builds each step's graph (also turned
    on by any observer or term with ``needs_grad``); gradients never flow from one step to the next.
    """
    if len(seeds) != cond.batch_size:
        raise DiffmemError(f"got {len(seeds)} seeds for a batch of {cond.batch_size}")
    if num_inference_steps < 1:
        raise DiffmemError(f"num_inference_steps must be at least 1; got {num_inference_steps}")
    if max_steps is not None and not 1 <= max_steps <= num_inference_steps:
        raise DiffmemError(
            f"max_steps must be between 1 and num_inference_steps={num_inference_steps}; got {max_steps}"
        )
    scale = resolve_guidance_scale(denoiser, guidance_scale)
    steps, generators, latents = _start(denoiser, seeds, num_inference_steps, scheduler)
    step_kwargs = _step_kwargs(steps, generators, eta)
    null = denoiser.null_condition(cond.batch_size)
    grad = grad or any(getattr(f, "needs_grad", False) for f in (*observers, *guidance))
    timesteps = steps.timesteps[:max_steps]
    for index, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        x_t = _model_input(steps, latents, t)
        with torch.set_grad_enabled(grad):
            if grad:
                x_t = x_t.detach().requires_grad_(True)
            eps_cond, eps_uncond, variance = predict_pair(denoiser, x_t, t, cond, null)
            # classifier-free guidance (Ho & Salimans 2022, eq. 6)
            eps = eps_cond if eps_cond is eps_uncond else eps_uncond + scale * (eps_cond - eps_uncond)
            alpha_bar_t = denoiser.alpha_bar(t).to(x_t.device)
            state = StepState(
                index=index,
                num_steps=len(steps.timesteps),
                t=t,
                alpha_bar_t=alpha_bar_t,
                x_t=x_t,
                eps_cond=eps_cond,
                eps_uncond=eps_uncond,
                eps=eps,
                x0_hat=x0_from_prediction(x_t, eps, alpha_bar_t.to(eps.dtype), denoiser.prediction_type),
                cond=cond,
                null=null,
                guidance_scale=scale,
                seeds=tuple(int(s) for s in seeds),
            )
            for observe in observers:
                observe(state)
            for term in guidance:
                eps = eps + term(state)
        model_output = (
            eps.detach() if variance is None else torch.cat([eps.detach(), variance.detach()], dim=1)
        )
        latents = steps.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def first_step_input(
    denoiser: Denoiser,
    seeds: Sequence[int],
    num_inference_steps: int = 50,
    scheduler: SchedulerMixin | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input of :func:`sample`'s first step for these seeds ([B, C, H, W], from x_T) and its t."""
    steps, _, latents = _start(denoiser, seeds, num_inference_steps, scheduler)
    t = steps.timesteps[0]
    return _model_input(steps, latents, t), t


def _start(
    denoiser: Denoiser, seeds: Sequence[int], num_inference_steps: int, scheduler: SchedulerMixin | None
) -> tuple[SchedulerMixin, list[torch.Generator], torch.Tensor]:
    """A fresh scheduler set to the schedule, one generator per sample, and the initial noise x_T."""
    steps = schedule(denoiser, num_inference_steps, scheduler)
    generators = seeded_generators(seeds)
    latents = initial_noise(generators, denoiser.sample_shape, denoiser.device, denoiser.dtype)
    return steps, generators, latents * getattr(steps, "init_noise_sigma", 1.0)


def schedule(
    denoiser: Denoiser, num_inference_steps: int, scheduler: SchedulerMixin | None = None
) -> SchedulerMixin:
    """A fresh scheduler (the model's own by default) set to ``num_inference_steps`` as the pipeline sets it."""
    steps = eps_scheduler(scheduler or denoiser.scheduler)
    flow_model = denoiser.prediction_type == FLOW_PREDICTION
    if flow_model != is_flow_matching(steps):
        kind = "a flow-matching" if flow_model else "a noise-prediction"
        raise DiffmemError(f"{denoiser.family} needs {kind} scheduler; got {type(steps).__name__}")
    options = denoiser.timestep_options(num_inference_steps) if flow_model else {}
    steps.set_timesteps(num_inference_steps, device=denoiser.device, **options)
    return steps


def _model_input(steps: SchedulerMixin, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model sees at step t: the scaled sample (flow-matching schedulers do not scale)."""
    return latents if is_flow_matching(steps) else steps.scale_model_input(latents, t)


def predict_pair(
    denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Condition, null: Condition
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """eps_cond, eps_uncond (one batched call; the same tensor for unconditional models) and the
    conditional learned variance, if any."""
    if denoiser.conditioning == "none":
        prediction = denoiser.predict(x_t, t, cond)
        return prediction.eps, prediction.eps, prediction.variance
    pair = Condition.cat([null, cond])
    prediction = denoiser.predict(torch.cat([x_t, x_t]), t, pair)
    eps_uncond, eps_cond = prediction.eps.chunk(2)
    variance = None if prediction.variance is None else prediction.variance.chunk(2)[1]
    return eps_cond, eps_uncond, variance


def resolve_guidance_scale(denoiser: Denoiser, guidance_scale: float | None) -> float:
    """The guidance scale to use: the family default when None, checked against the model."""
    if guidance_scale is None:
        return float(denoiser.default_guidance_scale)
    if denoiser.conditioning == "none" and guidance_scale != 1.0:
        raise DiffmemError(
            f"unconditional models have no classifier-free guidance; got guidance_scale={guidance_scale}"
        )
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise DiffmemError(f"guidance_scale must be a finite non-negative number; got {guidance_scale}")
    return float(guidance_scale)


def eps_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A fresh copy of a scheduler that takes eps predictions (the denoiser converts v and x0 to eps);
    a flow-matching scheduler is copied as it is (it takes the velocity flow models predict)."""
    if is_flow_matching(scheduler):
        return type(scheduler).from_config(scheduler.config)
    if "prediction_type" not in scheduler.config:
        raise DiffmemError(
            f"{type(scheduler).__name__} does not take noise predictions; use DDIM, DDPM, PNDM, Euler, ..."
        )
    return type(scheduler).from_config(scheduler.config, prediction_type="epsilon")


def _step_kwargs(scheduler: SchedulerMixin, generators: list[torch.Generator], eta: float) -> dict:
    """The optional arguments of ``scheduler.step`` that this scheduler accepts."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted:
        kwargs["eta"] = eta
    elif eta:
        raise DiffmemError(f"eta applies to DDIM-type schedulers; {type(scheduler).__name__} takes none")
    return kwargs

"""The denoiser contract: the one interface every diffmem algorithm is written against.

A denoiser encodes prompts (or class labels, or nothing) into a :class:`~diffmem.core.condition.Condition`,
predicts the noise ``eps(x_t, t, cond)`` for a batch, knows ``alpha_bar_t`` of its training schedule and
decodes its sampling space to images in [0, 1]. Models that predict ``v`` or ``x_0`` are converted to
``eps`` here, so algorithms never branch on the prediction type or the model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from diffusers import SchedulerMixin
from transformers import PreTrainedTokenizerBase

from diffmem.core.condition import Condition

Conditioning = Literal["text", "class", "none"]


@dataclass(frozen=True)
class Prediction:
    """One denoiser evaluation."""

    eps: torch.Tensor  # [B, C, H, W] predicted noise
    variance: torch.Tensor | None = None  # [B, C, H, W] learned-variance channels (iDDPM), else None


@runtime_checkable
class Denoiser(Protocol):
    """A diffusion model seen as a noise predictor over a variance-preserving schedule."""

    family: str  # e.g. "stable-diffusion", "stable-diffusion-xl", "unet2d"
    conditioning: Conditioning
    prediction_type: str  # the model's native output: "epsilon", "v_prediction" or "sample"
    default_guidance_scale: float
    scheduler: SchedulerMixin  # the model's own scheduler; samplers work on a copy
    network: torch.nn.Module  # the noise-prediction network (UNet): where its attention layers live
    device: torch.device
    dtype: torch.dtype

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The (first) text encoder's tokenizer; None for models not conditioned on text."""

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders whose outputs form the condition (none for models without text)."""

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the space the sampler runs in: latents for latent models, pixels otherwise."""

    def encode(self, items: list) -> Condition:
        """Prompts (text models), class labels (class models) or placeholders (unconditional) as a batch."""

    def null_condition(self, batch_size: int) -> Condition:
        """The condition classifier-free guidance uses as unconditional, repeated batch_size times."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> Prediction:
        """Noise prediction (and learned variance, if any) for a batch at timestep(s) t."""

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Noise prediction for a batch: ``eps(x_t, t, cond)``, [B, C, H, W]."""

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """Cumulative signal fraction ``alpha_bar_t`` of the training schedule at t (same shape as t)."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W], from clean samples in the sampling space."""


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate from a noise prediction."""
    # x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (DDPM, Ho et al. eq. 15)
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def eps_from_model_output(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Noise prediction from a model's native output."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  eps = sqrt(abar) v + sqrt(1 - abar) x_t
        return alpha_bar_t.sqrt() * output + (1 - alpha_bar_t).sqrt() * x_t
    if prediction_type == "sample":
        # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        return (x_t - alpha_bar_t.sqrt() * output) / (1 - alpha_bar_t).sqrt()
    raise ValueError(f"unknown prediction type {prediction_type!r}")

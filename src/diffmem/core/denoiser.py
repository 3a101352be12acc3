"""The denoiser contract: the one interface every diffmem algorithm is written against.

A denoiser encodes prompts (or class labels, or nothing) into a :class:`~diffmem.core.condition.Condition`,
predicts the noise ``eps(x_t, t, cond)`` for a batch, knows ``alpha_bar_t`` of its training schedule and
decodes its sampling space to images in [0, 1]. Models that predict ``v`` or ``x_0`` are converted to
``eps`` here, so algorithms never branch on the prediction type or the model family.

Flow-matching models (rectified flow: SD3, Flux; ``prediction_type == "flow_prediction"``) are the one
exception: ``x_t = (1 - sigma_t) x_0 + sigma_t eps`` with ``sigma_t = t / num_train_timesteps``, and
their prediction is the velocity ``v = eps - x_0``, reported where the others report eps. It is what
their guidance combines (``v_u + s (v_c - v_u)``) and what their scheduler steps with. At a fixed x_t,
``x_0 = x_t - sigma_t v`` and ``eps = x_t + (1 - sigma_t) v``, so ``v_c - v_u = (eps_c - eps_u) /
(1 - sigma_t)``: the conditional part of v is the conditional part of the implied noise prediction,
scaled by a constant of the step, and stays defined at ``sigma_t = 1`` (x_T), where the implied eps is
x_T itself for every prompt. ``alpha_bar`` of a flow model is that of the variance-preserving schedule
with the same signal-to-noise ratio, ``(1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from diffusers import SchedulerMixin
from transformers import PreTrainedTokenizerBase

from diffmem.core.condition import Condition
from diffmem.errors import DiffmemError

Conditioning = Literal["text", "class", "none"]
TextAttention = Literal["cross", "joint"]
FLOW_PREDICTION = "flow_prediction"


@dataclass(frozen=True)
class Prediction:
    """One denoiser evaluation."""

    eps: torch.Tensor  # [B, C, H, W] predicted noise; the velocity v = eps - x0 for flow-matching models
    variance: torch.Tensor | None = None  # [B, C, H, W] learned-variance channels (iDDPM), else None


@runtime_checkable
class Denoiser(Protocol):
    """A diffusion model seen as a noise predictor over a variance-preserving schedule."""

    family: str  # e.g. "stable-diffusion", "stable-diffusion-xl", "unet2d"
    conditioning: Conditioning
    prediction_type: str  # native output: "epsilon", "v_prediction", "sample" or "flow_prediction"
    default_guidance_scale: float
    scheduler: SchedulerMixin  # the model's own scheduler; samplers work on a copy
    network: torch.nn.Module  # the noise-prediction network (UNet, transformer): where its attention lives
    # "cross": image queries attend to the text in cross-attention layers (UNets); "joint": image and text
    # tokens share one attention (MMDiT: SD3, Flux)
    text_attention: TextAttention
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

    def timestep_options(self, num_inference_steps: int) -> dict:
        """Extra arguments of the scheduler's ``set_timesteps`` as the pipeline passes them (flow models)."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W], from clean samples in the sampling space."""


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate from a noise prediction."""
    # x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (DDPM, Ho et al. eq. 15)
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def flow_sigma(alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow noise level ``sigma_t`` of the flow time with the signal fraction ``alpha_bar_t``."""
    # x_t = (1 - sigma) x0 + sigma eps has SNR ((1 - sigma) / sigma)^2 = abar / (1 - abar)
    return (1 - alpha_bar_t).sqrt() / (alpha_bar_t.sqrt() + (1 - alpha_bar_t).sqrt())


def x0_from_prediction(
    x_t: torch.Tensor, prediction: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Clean-sample estimate from a denoiser's prediction (eps, or v for flow-matching models)."""
    if prediction_type == FLOW_PREDICTION:
        # x_t = (1 - sigma) x0 + sigma eps and v = eps - x0  =>  x0 = x_t - sigma v   (Liu et al. 2023)
        return x_t - flow_sigma(alpha_bar_t) * prediction
    return x0_from_eps(x_t, prediction, alpha_bar_t)


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


def require_noise_prediction(denoiser: Denoiser, method: str) -> None:
    """Refuse, in one line, a method whose formulas are written for the variance-preserving eps scale."""
    if denoiser.prediction_type == FLOW_PREDICTION:
        raise DiffmemError(
            f"{method} does not support {denoiser.family}: it is a flow-matching model (velocity "
            "predictions) and the method's formulas are defined on the noise-prediction scale"
        )


def require_cross_attention(denoiser: Denoiser, method: str) -> None:
    """Refuse, in one line, a method that reads or scales text cross-attention on a joint-attention model."""
    if denoiser.text_attention == "joint":
        raise DiffmemError(
            f"{method} does not support {denoiser.family}: its transformer attends jointly over image and "
            "text tokens in one softmax, so it has no cross-attention over the prompt's tokens; "
            "use a detector on the prediction (noise_norm) instead"
        )


def require_start_token(denoiser: Denoiser, method: str) -> None:
    """Refuse, in one line, a method that reads the prompt's tokens from a start (BOS) token on, as CLIP
    lays them out, on a model whose tokenizer (T5) puts none before the prompt."""
    tokenizer = denoiser.tokenizer
    if tokenizer is not None and tokenizer.bos_token_id is None:
        raise DiffmemError(
            f"{method} does not support {denoiser.family}: its tokenizer ({type(tokenizer).__name__}) puts no "
            "start (BOS) token before the prompt, and the method reads token positions as CLIP lays them out"
        )

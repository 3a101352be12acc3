"""The rectified-flow objective Stable Diffusion 3 is trained with (Esser et al. 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis"), as diffusers' SD3 training script
(``examples/dreambooth/train_dreambooth_sd3.py``, its defaults) applies it.

Timesteps come from the logit-normal density of the paper's section 3.1 (``u = sigmoid(n)``,
``n ~ N(0, 1)``) looked up in the flow-matching scheduler's table of 1000 (shifted) sigmas; the sample is
the straight path between data and noise, ``x_t = (1 - sigma) x_0 + sigma eps`` (section 2, rectified
flow), and the network regresses its velocity ``v = d x_t / d sigma = eps - x_0``, every timestep weighted
alike (the script's loss weighting for ``logit_normal``; its default output preconditioning, which
regresses ``x_0`` instead, is not used: the SD3 pipeline and diffmem's adapter read the output as ``v``).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling


def flow_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-normal timesteps ``t`` [B] (what the transformer is given) and their sigmas [B], from the
    table of an untouched scheduler (its ``set_timesteps`` for sampling would replace the table)."""
    u = compute_density_for_timestep_sampling(
        "logit_normal", batch_size, logit_mean=0.0, logit_std=1.0, generator=generator
    )
    indices = (u * scheduler.config.num_train_timesteps).long()  # the table runs from sigma = 1 down
    return scheduler.timesteps[indices], scheduler.sigmas[indices]


def rectified_flow(
    x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised sample ``x_t`` [B, C, H, W] at noise levels ``sigma`` [B] and the velocity target."""
    sigma = sigma.to(x0).view(-1, *[1] * (x0.ndim - 1))
    x_t = (1 - sigma) * x0 + sigma * noise  # straight path from data (sigma = 0) to noise (sigma = 1)
    return x_t, noise - x0  # v = d x_t / d sigma

"""Ambient high-noise training (Shah, Kalavasis, Klivans, Daras 2025; SPEC §6): above a noise level
sigma_n the model learns only from a fixed noisy copy of each training image, so it cannot memorize the
images' fine detail; below sigma_n it learns from the clean images as usual.

In EDM (VE) notation, ``x_sigma = y + sigma z`` and the denoiser ``D(x, sigma)`` predicts the clean image.
Image i gets one noisy copy ``y_n = y + sigma_n eta_i`` (eta_i drawn once, seeded by i). For
sigma >= sigma_n the input is ``x = y_n + sqrt(sigma^2 - sigma_n^2) z`` and the loss compares
``((sigma^2 - sigma_n^2) / sigma^2) D(x, sigma) + (sigma_n^2 / sigma^2) x`` with ``y_n``; below sigma_n it
compares ``D(x, sigma)`` with ``y``.

The DDPM / VP form that Stable Diffusion and ``UNet2DModel`` use follows by the change of variables
``x_t = sqrt(abar_t) x_sigma`` with ``sigma_t^2 = (1 - abar_t) / abar_t``, and an eps-prediction
network's clean estimate ``D = x_sigma - sigma eps``. With the weight ``lambda(sigma) = 1 / sigma^2`` the
VE loss below sigma_n is the ordinary ``||eps - z||^2``; the VP loss here is that VE loss, computed
from the eps prediction (tested against the VE form and against a closed form). A velocity (SD 2.x) or
clean-sample network keeps its own plain loss below sigma_n with the weight of ``NATIVE_WEIGHTS``.

The rectified flow Stable Diffusion 3 trains on, ``x_t = (1 - s) x_0 + s eps``, is the VE form scaled:
``x_t / (1 - s) = x_0 + sigma eps`` with ``sigma = s / (1 - s)``. A velocity network's clean estimate is
``D = x_t - s v``, and the weight ``1 / s^2`` makes the loss below sigma_n the plain
``||v - (eps - x_0)||^2`` (tested against the VE form).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffmem.errors import DiffmemError

EDM_SIGMA_DATA = 0.5
# lambda(sigma) that makes the VE loss below sigma_n each parametrisation's plain MSE: the eps error is
# D's error / sigma, the v error D's error * sqrt(1 + sigma^2) / sigma (x0 = sqrt(abar) x_t - sqrt(1 - abar) v,
# 1 - abar = sigma^2 / (1 + sigma^2)), and the x0 error D's error
NATIVE_WEIGHTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "epsilon": lambda s: 1 / s**2,
    "v_prediction": lambda s: (1 + s**2) / s**2,
    "sample": torch.ones_like,
}


def edm_weight(sigma: torch.Tensor, sigma_data: float = EDM_SIGMA_DATA) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sigma_of_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The VE noise level of a VP timestep: sigma^2 = (1 - abar_t) / abar_t (SPEC §6)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def timestep_of_sigma(alphas_cumprod: torch.Tensor, sigma_n: float) -> int:
    """The first training timestep t_n whose noise level reaches sigma_n (the DDPM form of sigma_n)."""
    sigmas = sigma_of_alpha_bar(alphas_cumprod.double())
    if not 0 < sigma_n <= float(sigmas[-1]):
        raise DiffmemError(
            f"sigma_n={sigma_n} is outside the schedule's noise levels ({float(sigmas[0]):.4g} .. "
            f"{float(sigmas[-1]):.4g}): choose a sigma_n (or t_n) the schedule reaches"
        )
    return int(torch.nonzero(sigmas >= sigma_n)[0])


def noisy_copies(images: torch.Tensor, indices: Sequence[int], sigma_n: float, seed: int = 0) -> torch.Tensor:
    """Each image's fixed noisy copy ``y_n,i = y_i + sigma_n eta_i``, eta_i drawn from a generator seeded by
    (seed, i): the same copy whenever image i is drawn, in any batch, on any device."""
    if len(indices) != len(images):
        raise DiffmemError(f"give one dataset index per image; got {len(indices)} for {len(images)}")
    if sigma_n < 0:
        raise DiffmemError(f"sigma_n must be non-negative; got {sigma_n}")
    eta = torch.stack(
        [
            torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(_copy_seed(seed, int(i))))
            for i in indices
        ]
    )
    return images + sigma_n * eta.to(images.device, images.dtype)  # y_n = y + sigma_n eta   (SPEC §6)


def ambient_input(
    clean: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, sigma_n: float, z: torch.Tensor
) -> torch.Tensor:
    """The VE network input: ``y_n + sqrt(sigma^2 - sigma_n^2) z`` at sigma >= sigma_n, ``y + sigma z`` below."""
    high = _per_sample(sigma >= sigma_n, clean)
    s = _per_sample(sigma, clean)
    return torch.where(high, noisy + (s**2 - sigma_n**2).clamp_min(0).sqrt() * z, clean + s * z)


def ambient_loss_ve(
    denoised: torch.Tensor,
    x: torch.Tensor,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    sigma: torch.Tensor,
    sigma_n: float,
    weight: Callable[[torch.Tensor], torch.Tensor] = edm_weight,
) -> torch.Tensor:
    """[B] per-sample ambient loss (mean over C, H, W) of the clean estimate ``denoised`` = D(x, sigma)."""
    high = _per_sample(sigma >= sigma_n, clean)
    s = _per_sample(sigma, clean)
    # (sigma^2 - sigma_n^2) / sigma^2 D + sigma_n^2 / sigma^2 x, compared with y_n   (SPEC §6)
    ambient = ((s**2 - sigma_n**2) / s**2) * denoised + (sigma_n**2 / s**2) * x
    prediction = torch.where(high, ambient, denoised)
    target = torch.where(high, noisy, clean)
    return weight(sigma) * (prediction - target).square().flatten(1).mean(1)


def ambient_loss_vp(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    sigma_n: float,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """[B] the ambient loss at the VP input ``x_t`` of a network whose output, converted to the noise
    prediction ``eps``, is of ``prediction_type``; below sigma_n it equals that parametrisation's plain
    loss (``||eps - z||^2``, ``||v - v_target||^2`` or ``||x0 - y||^2``; mean over C, H, W)."""
    if prediction_type not in NATIVE_WEIGHTS:
        raise DiffmemError(
            f"unknown prediction type {prediction_type!r}; choose one of {', '.join(NATIVE_WEIGHTS)}"
        )
    sigma = sigma_of_alpha_bar(alpha_bar)
    x = x_t / _per_sample(alpha_bar, x_t).sqrt()  # x_sigma = x_t / sqrt(abar_t)
    denoised = x - _per_sample(sigma, x) * eps  # D = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    weight = NATIVE_WEIGHTS[prediction_type]
    return ambient_loss_ve(denoised, x, clean, noisy, sigma, sigma_n, weight=weight)


def ambient_vp_input(
    clean: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor, sigma_n: float, z: torch.Tensor
) -> torch.Tensor:
    """The VP network input ``x_t = sqrt(abar_t) x_sigma`` of :func:`ambient_input`."""
    sigma = sigma_of_alpha_bar(alpha_bar)
    return _per_sample(alpha_bar, clean).sqrt() * ambient_input(clean, noisy, sigma, sigma_n, z)


def flow_sigma_n(sigma_n: float) -> float:
    """The rectified flow's noise level ``s_n`` where the VE noise level reaches sigma_n: ``x_t / (1 - s)``
    is ``x_0 + (s / (1 - s)) eps``, so sigma = s / (1 - s) and s_n = sigma_n / (1 + sigma_n)."""
    if sigma_n < 0:
        raise DiffmemError(f"sigma_n must be non-negative; got {sigma_n}")
    return sigma_n / (1 + sigma_n)


def ambient_flow_input(
    clean: torch.Tensor, noisy: torch.Tensor, s: torch.Tensor, sigma_n: float, z: torch.Tensor
) -> torch.Tensor:
    """The rectified flow's input ``x_t = (1 - s) x_sigma`` of :func:`ambient_input` at sigma = s / (1 - s):
    ``(1 - s) y_n + sqrt(s^2 - ((1 - s) sigma_n)^2) z`` at s >= s_n, ``(1 - s) y + s z`` below (finite at
    s = 1, pure noise)."""
    high = _per_sample(s >= flow_sigma_n(sigma_n), clean)
    s = _per_sample(s, clean)
    extra = (s**2 - ((1 - s) * sigma_n) ** 2).clamp_min(0).sqrt()
    return torch.where(high, (1 - s) * noisy + extra * z, (1 - s) * clean + s * z)


def ambient_loss_flow(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    s: torch.Tensor,
    sigma_n: float,
) -> torch.Tensor:
    """[B] the ambient loss of a rectified-flow network's velocity at ``x_t`` (mean over C, H, W): the VE
    loss at sigma = s / (1 - s) with the clean estimate ``D = x_t - s v`` and the weight 1 / s^2, which makes
    it the plain ``||v - (z - y)||^2`` below s_n; written in s, so it stays finite at s = 1."""
    high = _per_sample(s >= flow_sigma_n(sigma_n), clean)
    s = _per_sample(s, clean).to(velocity.dtype)
    denoised = x_t - s * velocity  # x_0 = x_t - s v on the straight path
    # (sigma^2 - sigma_n^2) / sigma^2 D + sigma_n^2 / sigma^2 x_sigma, x_sigma = x_t / (1 - s)   (SPEC §6)
    share = sigma_n**2 * (1 - s) ** 2 / s**2  # sigma_n^2 / sigma^2
    ambient = (1 - share) * denoised + (sigma_n**2 * (1 - s) / s**2) * x_t
    prediction = torch.where(high, ambient, denoised)
    target = torch.where(high, noisy, clean)
    return ((prediction - target) / s).square().flatten(1).mean(1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] values shaped to broadcast over [B, C, H, W]."""
    return (
        values.to(like.device)
        .view(-1, *([1] * (like.dim() - 1)))
        .to(like.dtype if values.is_floating_point() else values.dtype)
    )


def _copy_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63)

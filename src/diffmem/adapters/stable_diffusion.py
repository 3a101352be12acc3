"""Stable Diffusion 1.x / 2.x (epsilon and v-prediction) as a denoiser, from its pipeline's components."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline

from diffmem.adapters.diffusers_base import DiffusersDenoiser
from diffmem.core.condition import Condition
from diffmem.errors import DiffmemError
from diffmem.io.prompts import encoding_problem


class StableDiffusionDenoiser(DiffusersDenoiser):
    """A ``StableDiffusionPipeline``'s UNet, text encoder and VAE behind the denoiser contract."""

    family = "stable-diffusion"
    conditioning = "text"
    default_guidance_scale = 7.5
    upcast_vae = False

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        resolution: tuple[int, int] | None = None,
        clip_skip: int | None = None,
    ) -> None:
        super().__init__(pipeline, pipeline.unet)
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.clip_skip = clip_skip
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        default = self.unet.config.sample_size * self.vae_scale_factor
        self.resolution = resolution or (default, default)
        if any(side % self.vae_scale_factor for side in self.resolution):
            raise DiffmemError(
                f"resolution {self.resolution} must be a multiple of the VAE factor {self.vae_scale_factor}"
            )
        self._null: Condition | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        height, width = self.resolution
        f = self.vae_scale_factor
        return (self.unet.config.in_channels, height // f, width // f)

    def encode(self, items: Sequence[str], differentiable: bool = False) -> Condition:
        """Prompts encoded exactly as the pipeline encodes them (``encode_prompt``); ``differentiable``
        keeps the text encoder's graph (for gradients with respect to its inputs)."""
        prompts = _check_prompts(items)
        with torch.set_grad_enabled(differentiable):
            prompt_embeds, _ = self.pipeline.encode_prompt(
                prompts, self.device, 1, do_classifier_free_guidance=False, clip_skip=self.clip_skip
            )
        return Condition({"prompt_embeds": prompt_embeds}, len(prompts), tuple(prompts))

    def null_condition(self, batch_size: int) -> Condition:
        """The empty prompt, as the pipeline's classifier-free guidance uses it."""
        if self._null is None:
            self._null = self.encode([""])
        return _expand(self._null, batch_size)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents through the VAE decoder to images in [0, 1]."""
        vae = self.vae
        latents = x0 / vae.config.scaling_factor
        if self.upcast_vae and vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            try:  # as the SDXL pipeline does: its VAE overflows in float16
                image = vae.float().decode(latents.float(), return_dict=False)[0].to(x0.dtype)
            finally:
                vae.to(torch.float16)
        else:
            image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


def _check_prompts(items: Sequence[str]) -> list[str]:
    prompts = [items] if isinstance(items, str) else list(items)
    if not prompts:
        raise DiffmemError("no prompts given")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise DiffmemError(f"prompts must be strings; got {type(bad[0]).__name__} {bad[0]!r}")
    for prompt in prompts:
        problem = encoding_problem(prompt)
        if problem is not None:
            raise DiffmemError(f"prompt {prompt[:60]!a} is not valid text: {problem}")
    return prompts


def _expand(single: Condition, batch_size: int) -> Condition:
    """A one-row condition repeated batch_size times without copying."""
    tensors = {k: v.expand(batch_size, *v.shape[1:]) for k, v in single.tensors.items()}
    prompts = None if single.prompts is None else single.prompts * batch_size
    return Condition(tensors, batch_size, prompts)

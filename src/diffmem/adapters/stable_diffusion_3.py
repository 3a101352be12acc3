"""Stable Diffusion 3 (MMDiT, rectified flow) as a denoiser, from its pipeline's components.

The model predicts the velocity ``v = eps - x_0`` of ``x_t = (1 - sigma_t) x_0 + sigma_t eps``; guidance
combines velocities, ``v_u + s (v_c - v_u)``, as ``StableDiffusion3Pipeline`` does, and the detection score
of Wen et al. (SPEC section 1) is ``||v_c - v_u||_2``. Wen et al. score the text-conditional part of the
prediction; at a fixed x_t the velocity's conditional part is the implied noise prediction's scaled by
``1 / (1 - sigma_t)`` (``v = eps - x_0`` and ``x_t = (1 - sigma) x_0 + sigma eps`` give ``Delta x_0 =
-sigma / (1 - sigma) Delta eps``), so prompts rank the same at any step with sigma < 1, and at x_T
(sigma = 1, SD3's first step) the velocity difference ``-Delta x_0`` is the one that is not zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline

from diffmem.adapters.flow_matching import FlowMatchingDenoiser
from diffmem.adapters.stable_diffusion import _check_prompts, _expand
from diffmem.core.condition import Condition
from diffmem.errors import DiffmemError


class StableDiffusion3Denoiser(FlowMatchingDenoiser):
    """A ``StableDiffusion3Pipeline``'s transformer, three text encoders and VAE behind the denoiser contract.

    The condition is ``prompt_embeds`` (both CLIP encoders' hidden states, concatenated and zero-padded to
    the T5 width, followed by T5's; zeros stand in for T5 when the pipeline has none) and
    ``pooled_projections`` (both CLIP encoders' pooled outputs).
    """

    family = "stable-diffusion-3"
    conditioning = "text"
    default_guidance_scale = 7.0

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        resolution: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
    ) -> None:
        super().__init__(pipeline, pipeline.transformer)
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.clip_skip = clip_skip
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = pipeline.vae_scale_factor
        default = self.transformer.config.sample_size * self.vae_scale_factor
        self.resolution = resolution or (default, default)
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        if any(side % multiple for side in self.resolution):
            raise DiffmemError(
                f"resolution {self.resolution} must be a multiple of {multiple} for this SD3 model"
            )
        self._null: Condition | None = None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The two CLIP encoders and T5 (when present), in the order their outputs are concatenated."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [e for e in (getattr(self.pipeline, name, None) for name in names) if e is not None]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        height, width = self.resolution
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    def encode(self, items: Sequence[str], differentiable: bool = False) -> Condition:
        """Prompts through the three encoders exactly as the pipeline encodes them (``encode_prompt``);
        ``differentiable`` keeps the text encoders' graph."""
        prompts = _check_prompts(items)
        with torch.set_grad_enabled(differentiable):
            prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                clip_skip=self.clip_skip,
                max_sequence_length=self.max_sequence_length,
            )
        tensors = {"prompt_embeds": prompt_embeds, "pooled_projections": pooled}
        return Condition(tensors, len(prompts), tuple(prompts))

    def null_condition(self, batch_size: int) -> Condition:
        """The empty prompt through all three encoders, as the pipeline's guidance uses it."""
        if self._null is None:
            self._null = self.encode([""])
        return _expand(self._null, batch_size)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        timestep = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        return self.transformer(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents through the VAE decoder (undoing its scale and shift) to images in [0, 1]."""
        config = self.vae.config
        latents = x0 / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

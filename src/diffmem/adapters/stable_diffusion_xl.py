"""Stable Diffusion XL as a denoiser: two text encoders, pooled embeddings and added time ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffmem.adapters.stable_diffusion import StableDiffusionDenoiser, _check_prompts, _expand
from diffmem.core.condition import Condition


class StableDiffusionXLDenoiser(StableDiffusionDenoiser):
    """A ``StableDiffusionXLPipeline``'s components behind the denoiser contract."""

    family = "stable-diffusion-xl"
    default_guidance_scale = 5.0
    upcast_vae = True

    def encode(self, items: Sequence[str], differentiable: bool = False) -> Condition:
        """Prompts through both encoders (``encode_prompt``), with the pooled embedding and time ids;
        ``differentiable`` keeps the text encoders' graph."""
        prompts = _check_prompts(items)
        with torch.set_grad_enabled(differentiable):
            prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompts,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                clip_skip=self.clip_skip,
            )
        return self._condition(prompt_embeds, pooled, tuple(prompts))

    def null_condition(self, batch_size: int) -> Condition:
        """Zeros when the pipeline forces zeros for the empty prompt (SDXL's default), else the encoded ""."""
        if self._null is None:
            null = self.encode([""])
            if self.pipeline.config.get("force_zeros_for_empty_prompt", False):
                null = self._condition(null["prompt_embeds"].zero_(), null["text_embeds"].zero_(), ("",))
            self._null = null
        return _expand(self._null, batch_size)

    def _condition(
        self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, prompts: tuple[str, ...]
    ) -> Condition:
        height, width = self.resolution
        # SDXL micro-conditioning: (original size, crop top-left, target size), no crop
        time_ids = torch.tensor(
            [[height, width, 0, 0, height, width]], device=self.device, dtype=prompt_embeds.dtype
        )
        tensors = {
            "prompt_embeds": prompt_embeds,
            "text_embeds": pooled,
            "time_ids": time_ids.expand(len(prompts), -1),
        }
        return Condition(tensors, len(prompts), prompts)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.unet(
            x_t, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added, return_dict=False
        )[0]

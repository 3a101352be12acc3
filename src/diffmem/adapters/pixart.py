"""PixArt-alpha and PixArt-sigma (DiT with T5 cross-attention, epsilon prediction) as denoisers.

The transformer outputs ``[eps, learned sigma]`` stacked on channels; the pipelines guide all channels and
then keep the eps half, stepping their scheduler with eps alone. The adapter does the same: the learned
sigma is dropped (``Prediction.variance`` is None), so any eps scheduler samples it as the pipeline does.
Samples are drawn at the adapter's ``resolution``; the pipelines' resolution binning (snapping a size to
the nearest trained aspect ratio) is left to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline, PixArtAlphaPipeline
from diffusers.utils import is_bs4_available, is_ftfy_available

from diffmem.adapters.diffusers_base import DiffusersDenoiser
from diffmem.adapters.stable_diffusion import _check_prompts, _expand
from diffmem.core.condition import Condition
from diffmem.core.denoiser import Prediction
from diffmem.errors import DiffmemError

_MICRO_CONDITIONED_SAMPLE_SIZE = 128  # PixArt-alpha 1024 px takes resolution and aspect ratio


class PixArtDenoiser(DiffusersDenoiser):
    """A ``PixArtAlphaPipeline``'s or ``PixArtSigmaPipeline``'s transformer, T5 and VAE behind the contract.

    The condition is ``prompt_embeds`` (T5's hidden states over ``max_sequence_length`` positions) and
    ``prompt_attention_mask`` (which of them hold the prompt; the transformer ignores padding).
    """

    conditioning = "text"
    default_guidance_scale = 4.5

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        resolution: tuple[int, int] | None = None,
        max_sequence_length: int | None = None,
        clean_caption: bool | None = None,
    ) -> None:
        super().__init__(pipeline, pipeline.transformer)
        alpha = isinstance(pipeline, PixArtAlphaPipeline)
        self.family = "pixart-alpha" if alpha else "pixart-sigma"
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.max_sequence_length = max_sequence_length or (120 if alpha else 300)  # the pipelines' defaults
        # the pipelines' default: clean captions when the libraries cleaning needs are installed
        self.clean_caption = (
            is_bs4_available() and is_ftfy_available() if clean_caption is None else clean_caption
        )
        self.vae_scale_factor = pipeline.vae_scale_factor
        default = self.transformer.config.sample_size * self.vae_scale_factor
        self.resolution = resolution or (default, default)
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        if any(side % multiple for side in self.resolution):
            raise DiffmemError(
                f"resolution {self.resolution} must be a multiple of {multiple} for this PixArt model"
            )
        self.micro_conditioned = (
            alpha and self.transformer.config.sample_size == _MICRO_CONDITIONED_SAMPLE_SIZE
        )
        self._null: Condition | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        height, width = self.resolution
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    def encode(self, items: Sequence[str], differentiable: bool = False) -> Condition:
        """Prompts through T5 exactly as the pipeline encodes them (``encode_prompt``), with their masks;
        ``differentiable`` keeps the text encoder's graph."""
        prompts = _check_prompts(items)
        with torch.set_grad_enabled(differentiable):
            prompt_embeds, mask, _, _ = self.pipeline.encode_prompt(
                prompts,
                do_classifier_free_guidance=False,
                device=self.device,
                clean_caption=self.clean_caption,
                max_sequence_length=self.max_sequence_length,
            )
        tensors = {"prompt_embeds": prompt_embeds, "prompt_attention_mask": mask}
        return Condition(tensors, len(prompts), tuple(prompts))

    def null_condition(self, batch_size: int) -> Condition:
        """The empty prompt, as the pipeline's classifier-free guidance uses it."""
        if self._null is None:
            self._null = self.encode([""])
        return _expand(self._null, batch_size)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> Prediction:
        """Noise prediction; the learned-sigma channels are dropped, as the pipelines drop them."""
        return Prediction(eps=super().predict(x_t, t, cond).eps)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        timestep = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        return self.transformer(
            x_t,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=timestep,
            added_cond_kwargs=self._micro_conditions(x_t),
            return_dict=False,
        )[0]

    def _micro_conditions(self, x_t: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """PixArt-alpha 1024 px's resolution and aspect-ratio conditions (None for the other models)."""
        if not self.micro_conditioned:
            return {"resolution": None, "aspect_ratio": None}
        height, width = self.resolution
        batch = x_t.shape[0]
        resolution = torch.tensor([height, width], device=x_t.device, dtype=x_t.dtype).repeat(batch, 1)
        aspect = torch.tensor([height / width], device=x_t.device, dtype=x_t.dtype).repeat(batch, 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents through the VAE decoder to images in [0, 1]."""
        latents = x0 / self.vae.config.scaling_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

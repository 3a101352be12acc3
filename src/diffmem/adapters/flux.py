"""Flux (dev and schnell: MMDiT, rectified flow) as a denoiser, from its pipeline's components.

Flux predicts the velocity ``v = eps - x_0`` (``diffmem.adapters.flow_matching``). Flux-dev is
guidance-distilled: the pipeline's ``guidance_scale`` is an input of the transformer (its guidance
embedding; here ``embedded_guidance``), and its normal path runs one conditional pass with no
unconditional branch. Flux-schnell has no guidance embedding. diffmem's sampler forms the true-CFG
path of ``FluxPipeline`` (``true_cfg_scale`` with the empty negative prompt): the conditional and the
empty-prompt velocity at the same x_t and embedded guidance, combined as ``v_u + s (v_c - v_u)``; at
the family's default ``s = 1`` that is the conditional velocity, the pipeline's normal path. The
detection score is ``||v_c - v_u||`` between these two passes: the part of the velocity the prompt
contributes over the empty prompt, as Wen et al. define it, with the distilled guidance held fixed.

Latents are kept unpacked (``[B, C, H, W]``) behind the contract; the adapter packs them into the
transformer's 2x2 patch tokens and back around each call (the scheduler step is elementwise, so
stepping either layout gives the same values).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import PreTrainedTokenizerBase

from diffmem.adapters.flow_matching import FlowMatchingDenoiser
from diffmem.adapters.stable_diffusion import _check_prompts, _expand
from diffmem.core.condition import Condition
from diffmem.errors import DiffmemError

_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's default latent size before packing (1024 px at factor 8)


class FluxDenoiser(FlowMatchingDenoiser):
    """A ``FluxPipeline``'s transformer, CLIP and T5 encoders and VAE behind the denoiser contract.

    The condition is ``prompt_embeds`` (T5's hidden states, the sequence the transformer attends to) and
    ``pooled_projections`` (CLIP's pooled output).
    """

    conditioning = "text"
    default_guidance_scale = 1.0  # true CFG off: the pipeline's normal path

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        resolution: tuple[int, int] | None = None,
        max_sequence_length: int = 512,
        embedded_guidance: float = 3.5,
    ) -> None:
        super().__init__(pipeline, pipeline.transformer)
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.family = "flux-dev" if self.guidance_embeds else "flux-schnell"
        self.max_sequence_length = max_sequence_length
        self.embedded_guidance = embedded_guidance
        self.vae_scale_factor = pipeline.vae_scale_factor
        default = _DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
        self.resolution = resolution or (default, default)
        multiple = 2 * self.vae_scale_factor
        if any(side % multiple for side in self.resolution):
            raise DiffmemError(f"resolution {self.resolution} must be a multiple of {multiple} for Flux")
        self._null: Condition | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """T5's tokenizer: its tokens are the positions of ``prompt_embeds``."""
        return self.pipeline.tokenizer_2

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        height, width = self.resolution
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels // 4, height // f, width // f)

    def timestep_options(self, num_inference_steps: int) -> dict:
        """FluxPipeline's schedule: sigmas from 1 to 1/N, shifted by ``mu`` of the packed token count."""
        config = self.scheduler.config
        _, height, width = self.sample_shape
        mu = calculate_shift(
            (height // 2) * (width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = torch.linspace(1.0, 1 / num_inference_steps, num_inference_steps, dtype=torch.float64)
        return {"sigmas": sigmas.numpy(), "mu": mu}

    def encode(self, items: Sequence[str], differentiable: bool = False) -> Condition:
        """Prompts through CLIP (pooled) and T5 exactly as the pipeline encodes them (``encode_prompt``);
        ``differentiable`` keeps the text encoders' graph."""
        prompts = _check_prompts(items)
        with torch.set_grad_enabled(differentiable):
            prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        tensors = {"prompt_embeds": prompt_embeds, "pooled_projections": pooled}
        return Condition(tensors, len(prompts), tuple(prompts))

    def null_condition(self, batch_size: int) -> Condition:
        """The empty prompt, as the pipeline's true-CFG path encodes an empty negative prompt."""
        if self._null is None:
            self._null = self.encode([""])
        return _expand(self._null, batch_size)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        batch, channels, height, width = x_t.shape
        embeds = cond["prompt_embeds"]
        packed = self.pipeline._pack_latents(x_t, batch, channels, height, width)
        image_ids = self.pipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, x_t.device, embeds.dtype
        )
        text_ids = torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=embeds.dtype)
        timestep = torch.as_tensor(t, device=x_t.device).expand(batch).to(x_t.dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full([1], self.embedded_guidance, device=x_t.device, dtype=torch.float32)
            guidance = guidance.expand(batch)
        velocity = self.transformer(
            hidden_states=packed,
            timestep=timestep / 1000,  # as the pipeline passes it: sigma_t
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        f = self.vae_scale_factor
        return self.pipeline._unpack_latents(velocity, height * f, width * f, f)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents through the VAE decoder (undoing its scale and shift) to images in [0, 1]."""
        config = self.vae.config
        latents = x0 / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

"""Tiny real diffusers pipelines with seeded random weights, for tests and the CLI's built-in model.

All models are float32, on the CPU and in eval mode; the same seed gives the same weights.
Class-conditional UNet2D pipelines have `num_classes + 1` class embeddings: the last one,
`unet.config.num_class_embeds - 1`, is the null class used for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffmem.errors import DiffmemError
from diffmem.sampling.schedulers import stable_diffusion_scheduler
from diffmem.text.clip_tokenizer import clip_text_config, load_clip_tokenizer

TEXT_HIDDEN = 32
LATENT_SAMPLE_SIZE = 8
UNET2D_SCHEDULERS = ("ddpm", "ddim")

_TIME_EMBED_DIM = 8
_NUM_TIME_IDS = 6


_Model = TypeVar("_Model", bound=torch.nn.Module)


def _seeded(seed: int, build: Callable[..., _Model], *args: object, **kwargs: object) -> _Model:
    """A model built from seeded weights, in eval mode; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args, **kwargs).eval()


def _text_config(**overrides: object) -> CLIPTextConfig:
    """A two-layer CLIP text encoder config that uses the real CLIP vocabulary."""
    return clip_text_config(TEXT_HIDDEN, num_layers=2, num_heads=4, intermediate_size=37, **overrides)


def _vae(seed: int) -> AutoencoderKL:
    """A two-level VAE (scale factor 2) with 4 latent channels."""
    return _seeded(
        seed,
        AutoencoderKL,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * LATENT_SAMPLE_SIZE,
    )


def _cond_unet(seed: int, cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    """A two-level text-conditioned UNet on 8x8x4 latents."""
    return _seeded(
        seed,
        UNet2DConditionModel,
        sample_size=LATENT_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        **extra,
    )


def tiny_stable_diffusion(
    prediction_type: str = "epsilon", scheduler: str = "ddim", seed: int = 0
) -> StableDiffusionPipeline:
    """A 16x16-pixel Stable Diffusion pipeline with the real CLIP tokenizer and random weights."""
    scheduler_model = stable_diffusion_scheduler(scheduler, prediction_type)
    return StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=_seeded(seed, CLIPTextModel, _text_config()),
        tokenizer=load_clip_tokenizer(),
        unet=_cond_unet(seed, cross_attention_dim=TEXT_HIDDEN),
        scheduler=scheduler_model,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_stable_diffusion_xl(scheduler: str = "euler", seed: int = 0) -> StableDiffusionXLPipeline:
    """A 16x16-pixel SDXL pipeline with two text encoders, the real CLIP tokenizer and random weights."""
    scheduler_model = stable_diffusion_scheduler(scheduler, "epsilon")
    unet = _cond_unet(
        seed,
        cross_attention_dim=2 * TEXT_HIDDEN,
        transformer_layers_per_block=1,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=_NUM_TIME_IDS * _TIME_EMBED_DIM + TEXT_HIDDEN,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed),
        text_encoder=_seeded(seed, CLIPTextModel, _text_config()),
        text_encoder_2=_seeded(seed, CLIPTextModelWithProjection, _text_config(projection_dim=TEXT_HIDDEN)),
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler_model,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def tiny_unet2d(
    class_conditional: bool = False,
    num_classes: int = 10,
    scheduler: str = "ddpm",
    learned_variance: bool = False,
    seed: int = 0,
) -> DDPMPipeline | DDIMPipeline:
    """An 8x8 RGB pixel-space UNet pipeline; class-conditional ones reserve class `num_classes` as null."""
    if scheduler not in UNET2D_SCHEDULERS:
        raise DiffmemError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(UNET2D_SCHEDULERS)}")
    if learned_variance and scheduler != "ddpm":
        raise DiffmemError("a learned variance needs the 'ddpm' scheduler")
    unet = _seeded(
        seed,
        UNet2DModel,
        sample_size=LATENT_SAMPLE_SIZE,
        in_channels=3,
        out_channels=6 if learned_variance else 3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=num_classes + 1 if class_conditional else None,
    )
    if scheduler == "ddim":
        return DDIMPipeline(
            unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        )
    variance_type = "learned_range" if learned_variance else "fixed_small"
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type=variance_type)
    return DDPMPipeline(unet=unet, scheduler=ddpm)

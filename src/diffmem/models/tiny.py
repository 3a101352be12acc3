"""Tiny real diffusers pipelines with seeded random weights, for tests and the CLI's built-in model.

All models are float32, on the CPU and in eval mode; the same seed gives the same weights.
Class-conditional UNet2D pipelines have `num_classes + 1` class embeddings: the last one,
`unet.config.num_class_embeds - 1`, is the null class used for classifier-free guidance.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from diffmem.errors import DiffmemError
from diffmem.sampling.schedulers import stable_diffusion_scheduler
from diffmem.text.clip_tokenizer import clip_text_config, load_clip_tokenizer

TEXT_HIDDEN = 32
LATENT_SAMPLE_SIZE = 8
UNET2D_SCHEDULERS = ("ddpm", "ddim")
PIXART_SCHEDULERS = ("dpm-solver++", "ddim")

_SD3_CLIP_HIDDEN = 16  # two CLIP encoders, concatenated and padded to the T5 width TEXT_HIDDEN
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


def _vae(seed: int, **extra: object) -> AutoencoderKL:
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
        **extra,
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


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A character-level T5 (Unigram) tokenizer over printable ASCII, built in code without any download."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    characters = [(c, -3.0) for c in string.printable if not c.isspace()]
    return T5TokenizerFast(vocab=specials + characters, extra_ids=0)


def _tiny_t5(tokenizer: T5TokenizerFast, seed: int) -> T5EncoderModel:
    """A one-layer T5 encoder of width TEXT_HIDDEN over the tokenizer's vocabulary."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_HIDDEN,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed, T5EncoderModel, config)


def tiny_stable_diffusion_3(with_t5: bool = True, seed: int = 0) -> StableDiffusion3Pipeline:
    """A 16x16-pixel SD3 pipeline (MMDiT, rectified flow): two CLIP encoders with projection, a T5 encoder
    (or none, as diffusers allows: zeros then stand in for its embeddings), random weights."""
    clip = {"hidden_size": _SD3_CLIP_HIDDEN, "num_layers": 1, "num_heads": 2, "intermediate_size": 37}
    clip_config = clip_text_config(**clip, projection_dim=_SD3_CLIP_HIDDEN)
    tokenizer_3 = tiny_t5_tokenizer()
    transformer = _seeded(
        seed,
        SD3Transformer2DModel,
        sample_size=LATENT_SAMPLE_SIZE,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN,
        caption_projection_dim=TEXT_HIDDEN,
        pooled_projection_dim=2 * _SD3_CLIP_HIDDEN,
        pos_embed_max_size=LATENT_SAMPLE_SIZE,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_seeded(seed, CLIPTextModelWithProjection, clip_config),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=_seeded(seed + 1, CLIPTextModelWithProjection, clip_config),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        text_encoder_3=_tiny_t5(tokenizer_3, seed) if with_t5 else None,
        tokenizer_3=tokenizer_3 if with_t5 else None,
    )


def tiny_pixart(
    sigma: bool = False, scheduler: str = "dpm-solver++", seed: int = 0
) -> PixArtAlphaPipeline | PixArtSigmaPipeline:
    """A 16x16-pixel PixArt-alpha (or -sigma) pipeline: a DiT with T5 cross-attention and learned sigma."""
    if scheduler not in PIXART_SCHEDULERS:
        raise DiffmemError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(PIXART_SCHEDULERS)}")
    transformer = _seeded(
        seed,
        PixArtTransformer2DModel,
        sample_size=LATENT_SAMPLE_SIZE,
        patch_size=2,
        in_channels=4,
        out_channels=8,  # eps and the learned sigma
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        cross_attention_dim=16,
        caption_channels=TEXT_HIDDEN,
    )
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    steps = (
        DPMSolverMultistepScheduler(**schedule) if scheduler == "dpm-solver++" else DDIMScheduler(**schedule)
    )
    tokenizer = tiny_t5_tokenizer()
    build = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return build(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5(tokenizer, seed),
        vae=_vae(seed),
        transformer=transformer,
        scheduler=steps,
    )


def tiny_flux(guidance_distilled: bool = True, seed: int = 0) -> FluxPipeline:
    """A 16x16-pixel Flux pipeline (MMDiT, rectified flow): CLIP (pooled) and T5 encoders, random weights;
    ``guidance_distilled`` gives Flux-dev's guidance embedding and dynamic shift, else Flux-schnell's."""
    transformer = _seeded(
        seed,
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=16,  # 4 latent channels packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=guidance_distilled,
        axes_dims_rope=(4, 2, 2),
    )
    if guidance_distilled:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    tokenizer_2 = tiny_t5_tokenizer()
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_seeded(seed, CLIPTextModel, _text_config()),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=_tiny_t5(tokenizer_2, seed),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )

"""Full-size architectures with random weights, what speed measurements run on: Stable Diffusion 1.5 and
Stable Diffusion 3 medium.

Speed depends on the architecture, not the weights, and no machine here can download real weights.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffmem.sampling.schedulers import stable_diffusion_scheduler
from diffmem.text.clip_tokenizer import clip_text_config, load_clip_tokenizer


def stable_diffusion_15(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0
) -> StableDiffusionPipeline:
    """An SD 1.5-shaped pipeline (860M-parameter UNet, CLIP ViT-L/14 text encoder, 512 px) with random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=8,
        )
        text_encoder = CLIPTextModel(
            clip_text_config(768, num_layers=12, num_heads=12, intermediate_size=3072)
        )
        vae = _vae(latent_channels=4, sample_size=512)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=stable_diffusion_scheduler("ddim", "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipeline.to(device=device, dtype=dtype)


def stable_diffusion_3_medium(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0
) -> StableDiffusion3Pipeline:
    """An SD3-medium-shaped pipeline with random weights: the 2B-parameter MMDiT (24 joint blocks of width
    1536, 1024 px by default), CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders with projection, the
    16-channel VAE and the shift-3 flow-matching scheduler, as ``stabilityai/stable-diffusion-3-medium-
    diffusers`` configures them. No T5 (``text_encoder_3=None``): the pipeline puts zeros of T5's shape in its
    place ([B, max_sequence_length, 4096]), so the transformer sees the sequence it sees with T5."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        )
        clip_l = clip_text_config(
            768, num_layers=12, num_heads=12, intermediate_size=3072, projection_dim=768
        )
        clip_g = clip_text_config(
            1280, num_layers=32, num_heads=20, intermediate_size=5120, projection_dim=1280, hidden_act="gelu"
        )
        text_encoder = CLIPTextModelWithProjection(clip_l)
        text_encoder_2 = CLIPTextModelWithProjection(clip_g)
        vae = _vae(
            latent_channels=16,
            sample_size=1024,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=load_clip_tokenizer(pad_token="!"),  # OpenCLIP pads with "!", as SD3's tokenizer_2 does
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return pipeline.to(device=device, dtype=dtype)


def _vae(latent_channels: int, sample_size: int, **extra: object) -> AutoencoderKL:
    """The Stable Diffusion VAE: four levels of 128 to 512 channels (8x downsampling), random weights."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        sample_size=sample_size,
        **extra,
    )

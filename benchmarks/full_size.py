"""Full-size Stable Diffusion 1.5 architecture with random weights: what speed measurements run on.

Speed depends on the architecture, not the weights, and no machine here can download real weights.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

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
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
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

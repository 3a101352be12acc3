"""The lab model's architecture: Stable Diffusion's components (VAE, text-conditioned UNet, CLIP text
encoder with the real CLIP tokenizer, SD noise schedule), scaled down to Fashion-MNIST scenes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from diffmem.errors import DiffmemError
from diffmem.sampling.schedulers import stable_diffusion_scheduler
from diffmem.text.clip_tokenizer import clip_text_config, load_clip_tokenizer

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class LabModelConfig:
    """Sizes and target of the lab model's components (defaults: the 64 px GPU lab model, about 11M
    parameters; the CPU presets keep the noise target of ``builtin:lab-micro``, and the shipped keyed lab
    is ``small()`` with ``prediction_type="v_prediction"``)."""

    image_size: int = 64
    vae_channels: tuple[int, ...] = (32, 64, 64)  # VAE factor 2 ** (levels - 1) = 4: 64 px -> 16x16 latents
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 96, 128)
    unet_layers_per_block: int = 2
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    # what the UNet predicts: "epsilon" (SD 1.x) or "v_prediction" (SD 2.x, whose loss weighs the
    # high-noise steps that place items; docs/results.md measures the difference on the keyed lab)
    prediction_type: str = "v_prediction"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise DiffmemError(
                f"unknown prediction type {self.prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}"
            )

    @classmethod
    def micro(cls) -> LabModelConfig:
        """A 32 px model on 8x8 latents that trains on 2 CPU cores in minutes (for tests)."""
        return cls(
            prediction_type="epsilon",
            image_size=32,
            vae_channels=(32, 32, 32),
            unet_channels=(32, 64),
            unet_layers_per_block=1,
            norm_num_groups=8,
            text_hidden=32,
            text_layers=2,
            text_heads=4,
        )

    @classmethod
    def small(cls) -> LabModelConfig:
        """The micro-lab's 32 px images with a UNet and text encoder twice as wide: it memorizes, and
        trains on one CPU thread in about 50 minutes (the shipped ``builtin:lab-micro``)."""
        return replace(cls.micro(), unet_channels=(64, 128), norm_num_groups=16, text_hidden=64)

    @property
    def latent_size(self) -> int:
        """Side of the latent grid the UNet runs on."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return asdict(self)


def build_vae(config: LabModelConfig, seed: int = 0) -> AutoencoderKL:
    """An untrained ``AutoencoderKL`` for lab images, initialised from ``seed``."""
    levels = len(config.vae_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=config.vae_channels,
            layers_per_block=1,
            latent_channels=config.latent_channels,
            norm_num_groups=min(config.norm_num_groups, min(config.vae_channels)),
            sample_size=config.image_size,
        )


def build_lab_pipeline(
    config: LabModelConfig, vae: AutoencoderKL | None = None, seed: int = 0
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` with untrained UNet and text encoder (and VAE unless given)."""
    levels = len(config.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=config.latent_size,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            block_out_channels=config.unet_channels,
            layers_per_block=config.unet_layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=config.text_hidden,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
        )
        text_config = clip_text_config(
            config.text_hidden,
            config.text_layers,
            config.text_heads,
            intermediate_size=4 * config.text_hidden,
        )
        text_encoder = CLIPTextModel(text_config)
    return StableDiffusionPipeline(
        vae=vae if vae is not None else build_vae(config, seed),
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=stable_diffusion_scheduler("ddim", config.prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

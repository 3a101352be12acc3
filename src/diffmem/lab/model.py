"""The lab model's architecture: Stable Diffusion's components (VAE, text-conditioned UNet, CLIP text
encoder with the real CLIP tokenizer, SD noise schedule), scaled down to Fashion-MNIST scenes; or, in the
``stable-diffusion-3`` family, SD3's (an MMDiT transformer, two CLIP encoders with projection and no T5,
the flow-matching scheduler) around the same VAE."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffmem.core.denoiser import FLOW_PREDICTION
from diffmem.errors import DiffmemError
from diffmem.sampling.schedulers import stable_diffusion_scheduler
from diffmem.text.clip_tokenizer import clip_text_config, load_clip_tokenizer

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet lab model may predict
SD = "stable-diffusion"
SD3 = "stable-diffusion-3"
FAMILIES = (SD, SD3)  # the adapters' family names


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
    # high-noise steps that place items; docs/results.md measures the difference on the keyed lab);
    # a stable-diffusion-3 model predicts the rectified flow's velocity ("flow_prediction")
    prediction_type: str = "v_prediction"
    family: str = SD  # SD: the UNet pipeline; SD3: an MMDiT transformer in place of UNet and text encoder
    transformer_layers: int = 4  # the SD3 family's MMDiT blocks (the unet_* sizes are the SD family's)
    transformer_width: int = 96  # its hidden size: heads x head dimension
    transformer_heads: int = 4

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise DiffmemError(f"unknown lab model family {self.family!r}; use one of {', '.join(FAMILIES)}")
        if self.family == SD3 and self.prediction_type != FLOW_PREDICTION:
            raise DiffmemError(
                f"a {SD3} lab model predicts the rectified flow's velocity ({FLOW_PREDICTION}), "
                f"not {self.prediction_type!r}; drop the prediction type"
            )
        if self.family == SD and self.prediction_type not in PREDICTION_TYPES:
            raise DiffmemError(
                f"unknown prediction type {self.prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}"
            )
        if self.transformer_width % self.transformer_heads:
            raise DiffmemError(
                f"transformer_width {self.transformer_width} must be a multiple of "
                f"transformer_heads {self.transformer_heads}"
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

    def in_family(self, family: str) -> LabModelConfig:
        """These sizes in ``family``: an SD3 model predicts the flow velocity, an SD one keeps its target."""
        if family == SD3:
            return replace(self, family=SD3, prediction_type=FLOW_PREDICTION)
        return replace(self, family=family)

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
) -> StableDiffusionPipeline | StableDiffusion3Pipeline:
    """The config's family of pipeline with untrained denoiser and text encoders (and VAE unless given)."""
    vae = vae if vae is not None else build_vae(config, seed)
    if config.family == SD3:
        return _sd3_pipeline(config, vae, seed)
    return _sd_pipeline(config, vae, seed)


def _sd_pipeline(config: LabModelConfig, vae: AutoencoderKL, seed: int) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline``: a UNet cross-attending to one CLIP text encoder, SD's DDIM schedule."""
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
        text_encoder = CLIPTextModel(_text_config(config))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=stable_diffusion_scheduler("ddim", config.prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd3_pipeline(config: LabModelConfig, vae: AutoencoderKL, seed: int) -> StableDiffusion3Pipeline:
    """A ``StableDiffusion3Pipeline`` without T5: an MMDiT over one token per latent pixel, two CLIP encoders
    with projection (the second tokenizer pads with "!", as SD3's does), the flow-matching Euler scheduler.

    The pipeline concatenates the two encoders' penultimate hidden states (the joint attention's width is
    their sum) and appends zeros where T5's tokens would be; their pooled outputs are the pooled projection.
    """
    text_width = 2 * config.text_hidden
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=config.latent_size,
            patch_size=1,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            num_layers=config.transformer_layers,
            attention_head_dim=config.transformer_width // config.transformer_heads,
            num_attention_heads=config.transformer_heads,
            joint_attention_dim=text_width,
            caption_projection_dim=config.transformer_width,
            pooled_projection_dim=text_width,
            pos_embed_max_size=config.latent_size,
        )
        text_encoder = CLIPTextModelWithProjection(_text_config(config, projection_dim=config.text_hidden))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(config, projection_dim=config.text_hidden))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),  # no shift: SD3 shifts by 3 for 1024 px
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _text_config(config: LabModelConfig, **overrides: object) -> CLIPTextConfig:
    """The lab's CLIP text-encoder sizes over the real CLIP vocabulary."""
    hidden = config.text_hidden
    return clip_text_config(hidden, config.text_layers, config.text_heads, 4 * hidden, **overrides)

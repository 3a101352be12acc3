"""What a loaded model is: family, prediction type, resolution, text encoders, parameter counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from diffmem.adapters import DiffusersDenoiser


@dataclass(frozen=True)
class TextEncoderInfo:
    """One text encoder of a text-to-image model."""

    name: str  # component name, e.g. "text_encoder_2"
    class_name: str
    hidden_size: int
    max_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    """A summary of a denoiser and the pipeline behind it."""

    family: str
    pipeline_class: str
    conditioning: str
    prediction_type: str
    resolution: tuple[int, int]  # (H, W) of generated images
    sample_shape: tuple[int, int, int]  # (C, H, W) the sampler runs in
    scheduler: str
    num_train_timesteps: int
    default_guidance_scale: float
    text_encoders: tuple[TextEncoderInfo, ...]
    parameters: dict[str, int]  # component -> parameter count
    device: str
    dtype: str

    def to_dict(self) -> dict:
        """Plain JSON-ready dictionary."""
        return asdict(self)


def describe(denoiser: DiffusersDenoiser) -> ModelInfo:
    """The summary ``diffmem info`` prints."""
    components = denoiser.pipeline.components
    modules = {name: c for name, c in components.items() if isinstance(c, torch.nn.Module)}
    encoders = tuple(
        TextEncoderInfo(
            name=name,
            class_name=type(modules[name]).__name__,
            hidden_size=int(modules[name].config.hidden_size),
            max_tokens=int(modules[name].config.max_position_embeddings),
        )
        for name in ("text_encoder", "text_encoder_2")
        if name in modules
    )
    channels, height, width = denoiser.sample_shape
    scale = getattr(denoiser, "vae_scale_factor", 1)
    return ModelInfo(
        family=denoiser.family,
        pipeline_class=type(denoiser.pipeline).__name__,
        conditioning=denoiser.conditioning,
        prediction_type=denoiser.prediction_type,
        resolution=(height * scale, width * scale),
        sample_shape=(channels, height, width),
        scheduler=type(denoiser.scheduler).__name__,
        num_train_timesteps=denoiser.num_train_timesteps,
        default_guidance_scale=denoiser.default_guidance_scale,
        text_encoders=encoders,
        parameters={name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()},
        device=str(denoiser.device),
        dtype=str(denoiser.dtype).removeprefix("torch."),
    )

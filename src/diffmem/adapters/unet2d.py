"""Unconditional and class-conditional ``UNet2DModel`` pixel models (DDPM / iDDPM) as a denoiser."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline

from diffmem.adapters.diffusers_base import DiffusersDenoiser
from diffmem.core.condition import Condition
from diffmem.errors import DiffmemError


class UNet2DDenoiser(DiffusersDenoiser):
    """A ``UNet2DModel`` + scheduler (e.g. ``DDPMPipeline``) behind the denoiser contract.

    Class-conditional models (``num_class_embeds`` set) use ``null_class_label`` as the unconditional
    class for classifier-free guidance; by diffmem's convention it is the last class embedding, which
    training with label dropout reserves for "no class".
    """

    family = "unet2d"

    def __init__(self, pipeline: DiffusionPipeline, null_class_label: int | None = None) -> None:
        super().__init__(pipeline, pipeline.unet)
        self.unet = pipeline.unet
        num_class_embeds = self.unet.config.num_class_embeds
        self.conditioning = "class" if num_class_embeds else "none"
        self.default_guidance_scale = 1.0
        self.num_classes = num_class_embeds - 1 if num_class_embeds else 0
        self.null_class_label = null_class_label if null_class_label is not None else self.num_classes
        if num_class_embeds and not 0 <= self.null_class_label < num_class_embeds:
            raise DiffmemError(
                f"null_class_label must be in [0, {num_class_embeds}); got {self.null_class_label}"
            )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (self.unet.config.in_channels, height, width)

    def encode(self, items: Sequence[int | None]) -> Condition:
        """Class labels for a class-conditional model; for an unconditional one, only the batch size counts."""
        items = list(items)
        if not items:
            raise DiffmemError("nothing to encode: give one label (or None for unconditional) per sample")
        if self.conditioning == "none":
            return Condition({}, len(items))
        if any(not isinstance(i, int) or isinstance(i, bool) for i in items):
            raise DiffmemError(f"class-conditional model: give integer class labels, got {items[:4]}")
        if any(not 0 <= i < self.num_classes for i in items):
            raise DiffmemError(f"class labels must be in [0, {self.num_classes}); got {items[:4]}")
        labels = torch.tensor(items, dtype=torch.long, device=self.device)
        return Condition({"class_labels": labels}, len(items))

    def null_condition(self, batch_size: int) -> Condition:
        """The null class (class-conditional) or an empty condition (unconditional)."""
        if self.conditioning == "none":
            return Condition({}, batch_size)
        labels = torch.full((batch_size,), self.null_class_label, dtype=torch.long, device=self.device)
        return Condition({"class_labels": labels}, batch_size)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        class_labels = cond.tensors.get("class_labels")
        return self.unet(x_t, t, class_labels=class_labels, return_dict=False)[0]

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] to images in [0, 1]."""
        return (x0 / 2 + 0.5).clamp(0, 1)

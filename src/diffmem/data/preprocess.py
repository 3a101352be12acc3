"""Training images as diffusers' ``train_text_to_image.py`` prepares them: the shorter side resized to the
resolution (bilinear), a centre or random square crop, an optional horizontal flip, values in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """``image`` scaled (bilinear) so that its shorter side is ``resolution``, as torchvision's
    ``Resize(resolution)`` sizes it."""
    width, height = image.size
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    return image if size == image.size else image.resize(size, Image.BILINEAR)


def preprocess(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """float [3, resolution, resolution] in [-1, 1]: resized, cropped (centre, or at random), flipped
    left-right with probability 1/2 when ``random_flip``. ``generator`` draws the crop and the flip."""
    generator = generator if generator is not None else np.random.default_rng()
    image = resize_shorter_side(image.convert("RGB"), resolution)
    width, height = image.size
    if center_crop:  # torchvision's CenterCrop offsets
        top, left = round((height - resolution) / 2), round((width - resolution) / 2)
    else:
        top, left = (
            int(generator.integers(height - resolution + 1)),
            int(generator.integers(width - resolution + 1)),
        )
    array = np.array(image)[top : top + resolution, left : left + resolution]
    if random_flip and generator.random() < 0.5:
        array = array[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div(255.0)
    return pixels * 2 - 1

"""Deduplication before training (the remedy Somepalli et al. and Carlini et al. point to; SPEC §7): every
training image is kept once, and an image within ``max_l2`` (pixel RMS distance) of an image kept before
it is dropped, found through the training-set index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex


@dataclass(frozen=True)
class DeduplicationConfig:
    """Near-duplicates: RMS pixel distance (images in [0, 1]) at most ``max_l2``."""

    max_l2: float = 0.02
    neighbours: int = 8  # nearest images examined per image

    def __post_init__(self) -> None:
        if self.max_l2 < 0 or self.neighbours < 2:
            raise DiffmemError("deduplication needs max_l2 >= 0 and neighbours >= 2")


@dataclass(frozen=True)
class Deduplicated:
    """Which images survive, and how many rows and images went."""

    kept_images: list[int]  # positions in the image list, ascending
    rows_before: int
    rows_after: int
    images_dropped: int


def deduplicate(
    images: torch.Tensor, row_image: Sequence[int], config: DeduplicationConfig = DeduplicationConfig()
) -> Deduplicated:
    """Keep each image [N, 3, H, W] once (its first row) unless it nearly duplicates an earlier kept one."""
    if len(images) == 0:
        raise DiffmemError("nothing to deduplicate: no training images")
    index = TrainingSetIndex.build_pixels(images, [""] * len(images), exact=True)
    neighbours = index.search(images, min(config.neighbours, len(images)))
    kept: list[int] = []
    keep = [False] * len(images)
    for i in range(len(images)):
        close = [
            int(j)
            for j, d in zip(neighbours.index[i].tolist(), neighbours.distance[i].tolist())
            if j != i and d <= config.max_l2
        ]
        keep[i] = not any(j < i and keep[j] for j in close)
        if keep[i]:
            kept.append(i)
    used = {int(i) for i in row_image}
    return Deduplicated(
        kept_images=kept,
        rows_before=len(row_image),
        rows_after=len([i for i in kept if i in used]),
        images_dropped=len(images) - len(kept),
    )

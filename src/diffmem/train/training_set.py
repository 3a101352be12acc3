"""The training set as fine-tuning draws from it: rows, each a caption over one of the distinct images,
read from a lab dataset or from any training set :func:`diffmem.data.read_training_data` reads, with the
images prepared at one resolution as diffusers' ``train_text_to_image.py`` prepares them
(:func:`diffmem.data.preprocess`).

The distinct images are the distinct keys of the usable rows (an image folder's ``file_name``, a shard
sample's key, a ``datasets`` row number) in natural order of their keys (``img2`` before ``img10``); a lab
dataset's are its training scenes by ascending scene id, the order its ``lab export`` folder's file names
give, so that both train on the same rows over the same images.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffmem.data import RowReport, TrainingData, preprocess, read_training_data
from diffmem.data.lab_rows import is_lab_dataset
from diffmem.errors import DiffmemError
from diffmem.lab.dataset import LabDataset, load_lab_dataset

READ_BATCH = 64  # images read into memory at a time


@dataclass(frozen=True)
class DataOptions:
    """Which rows of a training set are read and how their images are prepared (the options of diffusers'
    ``train_text_to_image.py``; its default crop is random, diffmem's the centre, whose latents are
    cached)."""

    caption_column: str | None = None  # default text, else caption; for shards the caption extension, txt
    split: str | None = None  # a saved or cached ``datasets`` dataset's split (default train)
    resolution: int | None = None  # None: the model's sample size x VAE factor (a lab dataset: its own)
    center_crop: bool = True  # False: a random square crop at every draw
    random_flip: bool = False  # flip left-right with probability 1/2 at every draw

    def __post_init__(self) -> None:
        if self.resolution is not None and self.resolution < 8:
            raise DiffmemError(f"--resolution must be at least 8 pixels; got {self.resolution}")


@dataclass(frozen=True)
class TrainingSet:
    """Training rows over distinct images, and how the images are prepared."""

    description: str  # e.g. "image folder /data/photos"
    image_ids: list[int]  # [N] a lab image's scene id; else the source's number of the image's first row
    loaders: list[Callable[[], Image.Image]]  # [N] each image as RGB
    captions: list[str]  # [R] each row's caption
    row_image: list[int]  # [R] each row's image, a position in ``loaders``
    resolution: int  # images are square crops of this side
    center_crop: bool
    random_flip: bool
    groups: list[str] | None = None  # [R] a lab dataset's group of each row
    lab: LabDataset | None = None
    report: RowReport | None = None  # the rows read and those skipped (None for a lab dataset)

    @property
    def num_images(self) -> int:
        return len(self.loaders)

    @property
    def num_rows(self) -> int:
        return len(self.captions)

    @property
    def as_stored(self) -> bool:
        """Whether the images are used as they are stored: a lab dataset at its own size, centre-cropped,
        never flipped."""
        return (
            self.lab is not None
            and self.resolution == self.lab.config.image_size
            and self.center_crop
            and not self.random_flip
        )

    def first_images(self, count: int) -> TrainingSet:
        """The first ``count`` images and the rows that show them, in their order."""
        rows = [r for r, image in enumerate(self.row_image) if image < count]
        return replace(
            self,
            image_ids=self.image_ids[:count],
            loaders=self.loaders[:count],
            captions=[self.captions[r] for r in rows],
            row_image=[self.row_image[r] for r in rows],
            groups=None if self.groups is None else [self.groups[r] for r in rows],
        )

    def pixels(self, positions: Sequence[int], flipped: bool = False) -> torch.Tensor:
        """float [n, 3, R, R] in [-1, 1]: the images at ``positions`` resized and centre-cropped to the
        resolution, flipped left-right when ``flipped``."""
        pixels = torch.stack(
            [preprocess(self.loaders[p](), self.resolution, center_crop=True) for p in positions]
        )
        return pixels.flip(-1) if flipped else pixels

    def drawn_pixels(self, positions: Sequence[int], generator: np.random.Generator) -> torch.Tensor:
        """float [n, 3, R, R] in [-1, 1]: the images at ``positions`` as one draw prepares them (a random
        crop unless centre-cropped, a random flip when flipping), the choices drawn from ``generator``."""
        return torch.stack(
            [
                preprocess(self.loaders[p](), self.resolution, self.center_crop, self.random_flip, generator)
                for p in positions
            ]
        )

    def images(self) -> torch.Tensor:
        """Every image in memory, float [N, 3, H, W] in [0, 1]: a lab dataset's as stored, others resized
        and centre-cropped to the resolution (for deduplication and pixel-space models)."""
        if self.lab is not None:
            return self.lab.images(self.image_ids)
        chunks = range(0, self.num_images, READ_BATCH)
        pixels = torch.cat([self.pixels(range(s, min(s + READ_BATCH, self.num_images))) for s in chunks])
        return pixels.add_(1).div_(2)

    def image_digest(self) -> str:
        """SHA-256 of every image's size and RGB pixels, in order (what the images are, whatever their
        files are called); reads each image once."""
        digest = hashlib.sha256()
        for load in self.loaders:
            image = load()
            digest.update(f"{image.width}x{image.height};".encode())
            digest.update(image.tobytes())
        return digest.hexdigest()

    def fingerprint(self, image_digest: str) -> str:
        """SHA-256 of everything a run trains on: the images (their ``image_digest``), each row's caption and
        image, and how the images are prepared."""
        digest = hashlib.sha256(image_digest.encode())
        settings = [self.resolution, self.center_crop, self.random_flip]
        digest.update(json.dumps(settings).encode())
        for caption, image in zip(self.captions, self.row_image, strict=True):
            digest.update(json.dumps([caption, image]).encode())
        return digest.hexdigest()


def read_training_set(data: Path | str, options: DataOptions, model_resolution: int) -> TrainingSet:
    """The training set at ``data`` (a lab dataset, or any layout :func:`read_training_data` reads) with
    its images prepared at ``options.resolution``, by default ``model_resolution`` (a lab dataset: its own
    image size, so that its images are used as stored)."""
    if Path(data).is_dir() and is_lab_dataset(Path(data)):
        return _lab_set(Path(data), options)
    read = read_training_data(data, options.caption_column, options.split)
    return _rows_set(read, options, options.resolution or model_resolution)


def _lab_set(directory: Path, options: DataOptions) -> TrainingSet:
    """A lab dataset's training rows in row order over its training scenes by ascending scene id."""
    if options.caption_column not in (None, "caption"):
        raise DiffmemError("a lab dataset's captions are its caption column: drop --caption-column")
    if options.split is not None:
        raise DiffmemError("a lab dataset has one training split: drop --split")
    lab = load_lab_dataset(directory)
    row_scenes = lab.train.column("scene_id").to_pylist()
    scene_ids = sorted(set(row_scenes))
    position = {scene_id: i for i, scene_id in enumerate(scene_ids)}
    return TrainingSet(
        description=f"lab dataset {directory.resolve()}",
        image_ids=scene_ids,
        loaders=[lambda s=s: Image.fromarray(lab.scene_image(s)) for s in scene_ids],
        captions=lab.train.column("caption").to_pylist(),
        row_image=[position[s] for s in row_scenes],
        resolution=options.resolution or lab.config.image_size,
        center_crop=options.center_crop,
        random_flip=options.random_flip,
        groups=lab.train.column("group").to_pylist(),
        lab=lab,
    )


def _rows_set(read: TrainingData, options: DataOptions, resolution: int) -> TrainingSet:
    """The usable rows of any training set over their distinct keys in natural order."""
    first = {row.key: row for row in reversed(read.rows)}  # each key's first row
    keys = sorted(first, key=_natural)
    position = {key: i for i, key in enumerate(keys)}
    return TrainingSet(
        description=read.description,
        image_ids=[first[key].number for key in keys],
        loaders=[first[key].load for key in keys],
        captions=[row.caption for row in read.rows],
        row_image=[position[row.key] for row in read.rows],
        resolution=resolution,
        center_crop=options.center_crop,
        random_flip=options.random_flip,
        report=read.report,
    )


def _natural(key: str) -> list[str | int]:
    """A key's sort order with runs of digits compared as numbers (``img2`` before ``img10``)."""
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", key)]

"""Build a training-set index from a source: images as pixels, images through a copy-detection encoder,
or precomputed embeddings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from diffmem.errors import DiffmemError
from diffmem.index.manifest import KINDS, PIXELS
from diffmem.index.sources import EmbeddingSource, ImageSource
from diffmem.index.training_set_index import TrainingSetIndex
from diffmem.io.modules import WEIGHTS_NAME
from diffmem.metrics.copy_detection import embed, load_encoder, load_sscd_torchscript


def index_images(
    source: ImageSource,
    kind: str = PIXELS,
    encoder: Path | None = None,
    exact: bool | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> TrainingSetIndex:
    """Index ``source``'s images as pixels, or (``kind="embedding"``) as their ``encoder`` embeddings.

    ``encoder`` is a copy-detection encoder directory (``save_encoder``) or an SSCD TorchScript file; it
    runs on ``device``, ``batch_size`` images at a time.
    """
    if kind not in KINDS:
        raise DiffmemError(f"unknown index kind {kind!r}: use {' or '.join(KINDS)}")
    common = {
        "captions": source.captions,
        "caption_counts": source.caption_counts,
        "ids": source.ids,
        "exact": exact,
        "source": source.description,
        "lab_config": source.lab_config,
    }
    if kind == PIXELS:
        if encoder is not None:
            raise DiffmemError("an encoder is for embedding indexes: drop --encoder or pass --kind embedding")
        return TrainingSetIndex.build_pixels(torch.cat(list(source.batches(batch_size, progress))), **common)
    if encoder is None:
        raise DiffmemError(
            "an embedding index needs --encoder: a copy-detection encoder directory (save_encoder) "
            "or an SSCD TorchScript file"
        )
    network = open_encoder(encoder, device)
    embeddings = torch.cat([embed(network, images).cpu() for images in source.batches(batch_size, progress)])
    return TrainingSetIndex.build_embeddings(embeddings, encoder=describe_encoder(encoder), **common)


def index_embeddings(
    source: EmbeddingSource, exact: bool | None = None, encoder: str | None = None
) -> TrainingSetIndex:
    """Index precomputed embeddings; ``encoder`` describes the network that made them."""
    return TrainingSetIndex.build_embeddings(
        torch.from_numpy(source.embeddings),
        source.captions,
        source.caption_counts,
        source.ids,
        exact,
        encoder=encoder,
        source=source.description,
    )


def open_encoder(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """A copy-detection encoder: a directory written by ``save_encoder`` or an SSCD TorchScript file."""
    path = Path(path)
    if path.is_dir():
        return load_encoder(path, device)
    if path.is_file():
        return load_sscd_torchscript(path, device=device)
    raise DiffmemError(
        f"no encoder at {path}: pass a copy-detection encoder directory (save_encoder) or an SSCD "
        "TorchScript file"
    )


def describe_encoder(path: Path) -> str:
    """``PATH sha256=...`` of an encoder's weights, recorded with the index to check queries against."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise DiffmemError(f"no encoder weights at {weights}: pass the encoder that made the embeddings")
    digest = hashlib.sha256()
    with weights.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"{path.resolve()} sha256={digest.hexdigest()}"

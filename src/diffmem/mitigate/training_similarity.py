"""How close images are to the training set: the similarity Anti-Memorization Guidance gates on and
``generate`` reports (SPEC §5 and §8), measured through a training-set index."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex
from diffmem.index.build import describe_encoder, open_encoder
from diffmem.metrics.nl2 import NL2_ALPHA, NL2_K, nl2_to_neighbours


@dataclass(frozen=True)
class ReferenceSet:
    """A training set seen through its index and, for an embedding index, the copy-detection network
    that made its embeddings (images [B, 3, H, W] in [0, 1] -> unit vectors [B, D])."""

    index: TrainingSetIndex
    encoder: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.index.kind == "embedding" and self.encoder is None:
            raise DiffmemError("an embedding index needs the copy-detection encoder its embeddings came from")

    @property
    def measure(self) -> str:
        """ "nl2" for a pixel index, "copy_similarity" for an embedding index."""
        return "copy_similarity" if self.index.kind == "embedding" else "nl2"


def open_reference(index: Path, encoder: Path | None, device: str | torch.device = "cpu") -> ReferenceSet:
    """The training set of an index directory, with the copy-detection encoder of an embedding index:
    ``encoder``, or the one the index records; either must be the one that made its embeddings."""
    opened = TrainingSetIndex.load(index)
    if opened.kind != "embedding":
        return ReferenceSet(opened)
    recorded_path, _, recorded_digest = (opened.encoder or "").rpartition(" sha256=")
    path = encoder or (Path(recorded_path) if recorded_path else None)
    if path is None:
        raise DiffmemError(f"{index} holds embeddings: give the encoder that made them with --encoder")
    if describe_encoder(path).rpartition(" sha256=")[2] != recorded_digest:
        raise DiffmemError(f"{index} was built with another encoder than {path}: pass the one that made it")
    return ReferenceSet(opened, open_encoder(path, device))


def training_similarity(
    images: torch.Tensor, reference: ReferenceSet, k: int = NL2_K
) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma [B] (higher: more similar; differentiable w.r.t. ``images``) and the index row of each
    image's nearest training image [B].

    Pixel index: ``sigma = -nL2`` over the k nearest (AMG eq. 8); embedding index:
    ``sigma = <E(x), E(n0)>`` (AMG eq. 9).
    """
    index = reference.index
    if index.kind == "embedding":
        embeddings = reference.encoder(images)
        index.check_queries(embeddings)
        nearest = index.search(embeddings.detach(), 1).index[:, 0]
        # sigma_t = E(x0_hat)^T E(n0)   (AMG eq. 9)
        return (embeddings * index.vectors(nearest).to(embeddings)).sum(-1), nearest
    index.check_queries(images)
    rows = index.search(images.detach(), min(k, len(index))).index  # [B, k]
    nl2, position = nl2_to_neighbours(images, index.vectors(rows).to(images), NL2_ALPHA)
    # sigma_t = -nL2   (AMG eq. 8)
    return -nl2, rows.gather(1, position[:, None])[:, 0]


@torch.no_grad()
def measure_against_training(
    images: torch.Tensor, reference: ReferenceSet, batch_size: int = 64
) -> tuple[list[float], list[int]]:
    """Each image's similarity as reported (nL2, lower is closer; or copy similarity, higher is closer)
    and the id of its nearest training image, ``batch_size`` images at a time."""
    values, ids = [], []
    for start in range(0, len(images), batch_size):
        sigma, nearest = training_similarity(images[start : start + batch_size], reference)
        values += (-sigma if reference.measure == "nl2" else sigma).tolist()
        ids += [reference.index.ids[int(r)] for r in nearest]
    return values, ids

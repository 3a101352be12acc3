"""How close images are to the training set: the similarity Anti-Memorization Guidance gates on and
``generate`` reports (SPEC §5 and §8), measured through a training-set index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex
from diffmem.index.build import describe_encoder, open_encoder
from diffmem.metrics.nl2 import NL2_ALPHA, NL2_K, nl2_to_neighbours

DUPLICATE_SEARCH = 16  # neighbours searched for exact duplicates of a prompt's own training image
IDENTICAL = 1e-6  # pixel l2 at most this, or cosine similarity at least 1 minus this: the same image


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
    images: torch.Tensor, reference: ReferenceSet, k: int = NL2_K, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma [B] (higher: more similar; differentiable w.r.t. ``images``) and the index row of each
    image's nearest training image [B], leaving out of each image's neighbours the index rows in its row
    of ``exclude`` ([B, E], -1 for none).

    Pixel index: ``sigma = -nL2`` over the k nearest (AMG eq. 8); embedding index:
    ``sigma = <E(x), E(n0)>`` (AMG eq. 9).
    """
    index = reference.index
    if index.kind == "embedding":
        embeddings = reference.encoder(images)
        index.check_queries(embeddings)
        nearest = _neighbours(index, embeddings, 1, exclude)[:, 0]
        # sigma_t = E(x0_hat)^T E(n0)   (AMG eq. 9)
        return (embeddings * index.vectors(nearest).to(embeddings)).sum(-1), nearest
    index.check_queries(images)
    rows = _neighbours(index, images, k, exclude)  # [B, k]
    nl2, position = nl2_to_neighbours(images, index.vectors(rows).to(images), NL2_ALPHA)
    # sigma_t = -nL2   (AMG eq. 8)
    return -nl2, rows.gather(1, position[:, None])[:, 0]


def _neighbours(
    index: TrainingSetIndex, queries: torch.Tensor, k: int, exclude: torch.Tensor | None
) -> torch.Tensor:
    """The rows of each query's ``k`` nearest training images that ``exclude`` does not name [B, k]."""
    if exclude is None or exclude.shape[1] == 0:
        return index.search(queries.detach(), min(k, len(index))).index
    kept = len(index) - exclude.shape[1]
    if kept < 1:
        raise DiffmemError(f"leaving {exclude.shape[1]} rows out of a {len(index)}-row index leaves none")
    rows = index.search(queries.detach(), min(k + exclude.shape[1], len(index))).index
    left_out = (rows[:, :, None] == exclude[:, None, :].to(rows)).any(-1) | (rows < 0)
    order = torch.sort(left_out.to(torch.int8), dim=1, stable=True).indices  # kept rows first, in order
    return rows.gather(1, order)[:, : min(k, kept)]


def own_training_images(index: TrainingSetIndex, prompts: Sequence[str]) -> torch.Tensor:
    """For each prompt, the index rows it captions and the rows holding exactly the same image [P, E]
    (-1 pads; E = 0 when no prompt is a caption): what a training caption reproduces when its model
    copies its row."""
    captioned: dict[str, list[int]] = {}
    for row, caption in enumerate(index.captions):
        captioned.setdefault(caption, []).append(row)
    own = [set(captioned.get(p, [])) for p in prompts]
    rows = sorted(set().union(*own))
    if rows:
        found = index.search(index.vectors(torch.tensor(rows)), min(DUPLICATE_SEARCH, len(index)))
        same = found.distance <= IDENTICAL if index.kind == "pixels" else found.distance >= 1 - IDENTICAL
        twins = {r: set(found.index[i][same[i]].tolist()) for i, r in enumerate(rows)}
        own = [mine.union(*(twins[r] for r in mine)) for mine in own]
    width = max((len(mine) for mine in own), default=0)
    padded = [sorted(mine) + [-1] * (width - len(mine)) for mine in own]
    return torch.tensor(padded, dtype=torch.long).reshape(len(own), width)


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

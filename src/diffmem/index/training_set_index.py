"""The training-set index that Anti-Memorization Guidance queries at every sampling step.

Chen, Liu, Xu, "Towards Memorization-Free Diffusion Models", CVPR 2024 (SPEC §5, step 1): each step
finds the nearest training image ``n0`` of the predicted clean image and its caption ``y_N``; the
reference code queried a public LAION kNN service, this is the local replacement over the user's own
training set. It holds either pixels (for nL2: ``l2(a, b) = sqrt(mean((a - b)^2))``,
``diffmem.metrics.nl2``) or unit copy-detection embeddings (cosine similarity), one row per distinct
training image with its caption and how many training rows carry that caption.

On disk a directory: ``index.faiss`` (flat or IVF-PQ, memory-mapped on load), ``vectors.npy`` (the
float32 rows, memory-mapped; IVF-PQ candidates are re-ranked exactly against them),
``metadata.parquet`` (id, caption, caption_count) and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from diffmem.errors import DiffmemError
from diffmem.index.captions import caption_counts as count_captions
from diffmem.index.faiss_index import (
    IvfPq,
    build_faiss_index,
    choose_exact,
    read_faiss_index,
    search_all_cells,
)
from diffmem.index.manifest import EMBEDDING, PIXELS, REBUILD, IndexManifest, read_manifest

INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
METADATA_FILE = "metadata.parquet"
MANIFEST_FILE = "manifest.json"
METADATA_SCHEMA = pa.schema([("id", pa.int64()), ("caption", pa.string()), ("caption_count", pa.int64())])
RERANK_FACTOR = 4  # IVF-PQ: re-rank max(RERANK_FACTOR * k, RERANK_MIN) candidates exactly
RERANK_MIN = 32
UNIT_NORM_TOLERANCE = 1e-2  # embeddings' norms may differ from 1 by this much (float16 round-off)


@dataclass(frozen=True)
class Neighbours:
    """The k nearest index rows of each query, nearest first."""

    index: torch.Tensor  # [B, k] int64 row in the index
    distance: torch.Tensor  # [B, k] float32; pixels: l2, ascending; embeddings: cosine similarity, descending


class TrainingSetIndex:
    """Nearest training images (pixels or embeddings) with their captions; build, search, save, load.

    Make one with :meth:`build_pixels`, :meth:`build_embeddings` or :meth:`load`.
    """

    def __init__(
        self, manifest: IndexManifest, faiss_index: faiss.Index, vectors: np.ndarray, metadata: pa.Table
    ):
        self.manifest = manifest
        self._faiss = faiss_index
        self._vectors = vectors  # [N, D] float32, in memory or memory-mapped
        self._metadata = metadata

    @classmethod
    def build_pixels(
        cls,
        images: torch.Tensor,
        captions: Sequence[str],
        caption_counts: Sequence[int] | None = None,
        ids: Sequence[int] | None = None,
        exact: bool | None = None,
        source: str = "tensors",
        lab_config: dict | None = None,
    ) -> TrainingSetIndex:
        """Index training ``images`` [N, 3, H, W] in [0, 1] for pixel-level (nL2) search.

        ``caption_counts`` (training rows carrying each caption) default to the counts within
        ``captions``; ``ids`` (e.g. scene ids) to 0..N-1; ``exact`` to exact search while the images fit
        in 1 GiB; ``source`` says what was indexed, ``lab_config`` which lab dataset it was.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise DiffmemError(f"build_pixels takes RGB images [N, 3, H, W]; got shape {tuple(images.shape)}")
        if len(images) and not (images.isfinite().all() and images.min() >= 0 and images.max() <= 1):
            raise DiffmemError("build_pixels takes images in [0, 1]; map [-1, 1] images with (x + 1) / 2")
        vectors = (
            images.detach().to("cpu", torch.float32).flatten(1).numpy().copy()
        )  # never the caller's memory
        shape = tuple(images.shape[1:])
        metadata = (captions, caption_counts, ids)
        return cls._build(PIXELS, vectors, shape, *metadata, exact, source, None, lab_config)

    @classmethod
    def build_embeddings(
        cls,
        embeddings: torch.Tensor,
        captions: Sequence[str],
        caption_counts: Sequence[int] | None = None,
        ids: Sequence[int] | None = None,
        exact: bool | None = None,
        encoder: str | None = None,
        source: str = "tensors",
        lab_config: dict | None = None,
    ) -> TrainingSetIndex:
        """Index unit-normalised training ``embeddings`` [N, D] for cosine-similarity search.

        ``encoder`` describes the network that made them (recorded, so queries can be checked against
        it); the other arguments are as in :meth:`build_pixels`.
        """
        if embeddings.ndim != 2:
            raise DiffmemError(
                f"build_embeddings takes embeddings [N, D]; got shape {tuple(embeddings.shape)}"
            )
        vectors = embeddings.detach().to("cpu", torch.float32).numpy().copy()
        norms = np.linalg.norm(vectors, axis=1)
        if len(norms) and not np.all(np.abs(norms - 1) <= UNIT_NORM_TOLERANCE):
            raise DiffmemError(
                f"embeddings must be unit-normalised; norms range from {norms.min():.3g} to "
                f"{norms.max():.3g}: pass torch.nn.functional.normalize(embeddings, dim=1)"
            )
        metadata = (captions, caption_counts, ids)
        return cls._build(EMBEDDING, vectors, None, *metadata, exact, source, encoder, lab_config)

    @classmethod
    def _build(
        cls,
        kind: str,
        vectors: np.ndarray,
        image_shape: tuple[int, int, int] | None,
        captions: Sequence[str],
        caption_counts: Sequence[int] | None,
        ids: Sequence[int] | None,
        exact: bool | None,
        source: str,
        encoder: str | None,
        lab_config: dict | None,
    ) -> TrainingSetIndex:
        rows, dim = vectors.shape
        if rows == 0:
            raise DiffmemError("cannot index an empty training set: pass at least one row")
        counts = count_captions(captions) if caption_counts is None else list(caption_counts)
        ids = list(range(rows)) if ids is None else list(ids)
        for name, values in (("captions", captions), ("caption_counts", counts), ("ids", ids)):
            if len(values) != rows:
                raise DiffmemError(f"{name} has {len(values)} entries for {rows} rows: give one per row")
        metadata = pa.table({"id": ids, "caption": list(captions), "caption_count": counts}, METADATA_SCHEMA)
        exact = choose_exact(rows, dim) if exact is None else exact
        ivf_pq = None if exact else IvfPq.for_size(rows, dim)
        manifest = IndexManifest(
            kind=kind,
            rows=rows,
            dim=dim,
            image_shape=image_shape,
            exact=exact,
            ivf_pq=ivf_pq,
            duplicated_caption_rows=sum(count > 1 for count in counts),
            source=source,
            fingerprint=_fingerprint(vectors, metadata),
            encoder=encoder,
            diffmem_version=version("diffmem"),
            lab_config=lab_config,
        )
        return cls(manifest, build_faiss_index(vectors, kind == EMBEDDING, ivf_pq), vectors, metadata)

    @property
    def kind(self) -> str:
        """``"pixels"`` or ``"embedding"``."""
        return self.manifest.kind

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """[3, H, W] of the indexed images (pixels); None for embeddings."""
        return self.manifest.image_shape

    @property
    def dim(self) -> int:
        """Floats per row: 3 * H * W for pixels, the embedding size otherwise."""
        return self.manifest.dim

    @property
    def exact(self) -> bool:
        """True for a flat (exact) faiss index, False for IVF-PQ re-ranked exactly."""
        return self.manifest.exact

    @property
    def encoder(self) -> str | None:
        """The embedding network recorded at build time (embeddings only)."""
        return self.manifest.encoder

    def __len__(self) -> int:
        return self.manifest.rows

    @cached_property
    def captions(self) -> list[str]:
        """Each row's caption (an image's most frequent one)."""
        return self._metadata.column("caption").to_pylist()

    @cached_property
    def caption_counts(self) -> list[int]:
        """For each row, how many training rows carry exactly its caption."""
        return self._metadata.column("caption_count").to_pylist()

    @cached_property
    def ids(self) -> list[int]:
        """Each row's id in its source (scene id of a lab dataset, row of a metadata table)."""
        return self._metadata.column("id").to_pylist()

    def check_queries(self, queries: torch.Tensor) -> None:
        """Raise a DiffmemError unless ``queries`` are images [B, 3, H, W] or embeddings [B, D] of the
        index's size."""
        if self.kind == PIXELS:
            held = "x".join(map(str, self.image_shape))
            if queries.ndim != 4:
                raise DiffmemError(
                    f"index holds {held} images; got a tensor of shape {tuple(queries.shape)}: "
                    "pass images [B, 3, H, W]"
                )
            if tuple(queries.shape[1:]) != self.image_shape:
                got = "x".join(map(str, queries.shape[1:]))
                raise DiffmemError(
                    f"index holds {held} images; got {got}: build the index at the model's resolution"
                )
        elif queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DiffmemError(
                f"index holds {self.dim}-dim embeddings; got a tensor of shape {tuple(queries.shape)}: "
                f"embed the queries [B, {self.dim}] with the index's encoder "
                f"({self.encoder or 'not recorded'})"
            )

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, rerank: int | None = None) -> Neighbours:
        """The ``k`` nearest rows of each query (images [B, 3, H, W] or embeddings [B, D]).

        Distances are exact: pixels by l2 ascending, embeddings by cosine similarity descending. An IVF-PQ
        index re-ranks ``rerank`` candidates (default ``max(4k, 32)``) against the stored vectors.
        Results are on the queries' device, without gradients.
        """
        self.check_queries(queries)
        if not 1 <= k <= len(self):
            raise DiffmemError(f"k must be between 1 and the index's {len(self)} rows; got {k}")
        if rerank is not None and rerank < k:
            raise DiffmemError(f"rerank ({rerank}) must be at least k ({k}): it counts candidates re-ranked")
        flat = queries.detach().to("cpu", torch.float32).flatten(1).contiguous().numpy()
        if self.exact:
            candidates = self._faiss.search(flat, k)[1]
        else:
            candidates = self._faiss.search(
                flat, min(len(self), rerank or max(RERANK_FACTOR * k, RERANK_MIN))
            )[1]
            short = (candidates >= 0).sum(1) < k  # the probed cells held fewer than k rows
            if short.any():
                candidates[short] = search_all_cells(self._faiss, flat[short], candidates.shape[1])
        rows, distance = self._rerank(flat, candidates, k)
        return Neighbours(index=rows.to(queries.device), distance=distance.to(queries.device))

    def _rerank(
        self, queries: np.ndarray, candidates: np.ndarray, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, k] rows and exact distances of the best ``k`` of each query's candidates (-1: none)."""
        unique = np.unique(candidates[candidates >= 0])
        stored = torch.from_numpy(np.asarray(self._vectors[unique])).double()  # [U, D]
        q = torch.from_numpy(queries).double()  # float64, so near-copies keep their digits
        if self.kind == PIXELS:  # l2 = sqrt(||q - r||^2 / D), as diffmem.metrics.nl2.pairwise_l2
            squared = q.square().sum(1, keepdim=True) + stored.square().sum(1) - 2.0 * q @ stored.T
            score, missing = (squared.clamp_min(0.0) / self.dim).sqrt(), float("inf")
        else:
            score, missing = q @ stored.T, float("-inf")
        position = torch.from_numpy(np.searchsorted(unique, candidates.clip(min=0)))  # [B, C] column in score
        per_candidate = score.gather(1, position).masked_fill(torch.from_numpy(candidates < 0), missing)
        best = per_candidate.topk(k, dim=1, largest=self.kind == EMBEDDING)
        return torch.from_numpy(candidates).gather(1, best.indices), best.values.float()

    def vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """The stored rows (any shape of row numbers): images [..., 3, H, W] in [0, 1] for pixels,
        embeddings [..., D] otherwise; float32 on ``rows``' device."""
        flat = rows.detach().cpu().reshape(-1).numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise DiffmemError(
                f"rows must be between 0 and {len(self) - 1}; got {flat.min()} to {flat.max()}"
            )
        shape = self.image_shape if self.kind == PIXELS else (self.dim,)
        stored = torch.from_numpy(np.asarray(self._vectors[flat], dtype=np.float32))
        return stored.reshape(*rows.shape, *shape).to(rows.device)

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the index to ``directory`` (a new path, or an index to replace with ``overwrite``).

        The directory appears complete or not at all; returns it.
        """
        directory = Path(directory)
        if directory.exists():
            if not overwrite:
                raise DiffmemError(f"{directory} exists: choose a new path or pass overwrite (--overwrite)")
            if not directory.is_dir() or (
                any(directory.iterdir()) and not (directory / MANIFEST_FILE).is_file()
            ):
                raise DiffmemError(f"{directory} is not a training-set index; refusing to replace it")
        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            staging = scratch / directory.name
            staging.mkdir()
            faiss.write_index(self._faiss, str(staging / INDEX_FILE))
            np.save(staging / VECTORS_FILE, self._vectors)
            pq.write_table(self._metadata, staging / METADATA_FILE)
            (staging / MANIFEST_FILE).write_text(self.manifest.to_json(), encoding="utf-8")
            if directory.exists():
                shutil.rmtree(directory)
            staging.replace(directory)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TrainingSetIndex:
        """Open an index written by :meth:`save`, memory-mapped, after checking its files agree."""
        directory = Path(directory)
        if not (directory / MANIFEST_FILE).is_file():
            raise DiffmemError(
                f"{directory} is not a training-set index (no {MANIFEST_FILE}): "
                f"build one with `diffmem index build DATA --out {directory}`"
            )
        manifest = read_manifest(directory / MANIFEST_FILE)
        vectors = _load_vectors(directory / VECTORS_FILE, manifest)
        metadata = _load_metadata(directory / METADATA_FILE, manifest)
        faiss_index = read_faiss_index(directory / INDEX_FILE, manifest.exact)
        _check_faiss_index(faiss_index, manifest, directory / INDEX_FILE)
        return cls(manifest, faiss_index, vectors, metadata)


def _check_faiss_index(faiss_index: faiss.Index, manifest: IndexManifest, path: Path) -> None:
    """Raise unless the faiss index has the manifest's structure, metric, dimension and row count."""
    structure = faiss.IndexFlat if manifest.exact else faiss.IndexIVFPQ
    metric = faiss.METRIC_INNER_PRODUCT if manifest.exact and manifest.kind == EMBEDDING else faiss.METRIC_L2
    found = (faiss_index.metric_type, faiss_index.d, faiss_index.ntotal)
    if not isinstance(faiss_index, structure) or found != (metric, manifest.dim, manifest.rows):
        raise DiffmemError(
            f"{path} ({type(faiss_index).__name__} of {faiss_index.ntotal} rows x {faiss_index.d}) does not "
            f"match the manifest's {manifest.structure} of {manifest.rows} rows x {manifest.dim}; {REBUILD}"
        )


def _load_vectors(path: Path, manifest: IndexManifest) -> np.ndarray:
    try:
        vectors = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise DiffmemError(f"could not read {path} ({error}); {REBUILD}") from error
    if vectors.dtype != np.float32 or vectors.shape != (manifest.rows, manifest.dim):
        raise DiffmemError(
            f"{path} holds {vectors.dtype} {vectors.shape}, the manifest says float32 "
            f"({manifest.rows}, {manifest.dim}); {REBUILD}"
        )
    return vectors


def _load_metadata(path: Path, manifest: IndexManifest) -> pa.Table:
    try:
        metadata = pq.read_table(path, memory_map=True)
    except (OSError, pa.ArrowInvalid) as error:
        raise DiffmemError(f"could not read {path} ({error}); {REBUILD}") from error
    if not metadata.schema.equals(METADATA_SCHEMA) or metadata.num_rows != manifest.rows:
        raise DiffmemError(
            f"{path} does not hold {manifest.rows} rows of (id, caption, caption_count); {REBUILD}"
        )
    return metadata


def _fingerprint(vectors: np.ndarray, metadata: pa.Table) -> str:
    """sha256 of the vectors' bytes and the metadata's values."""
    digest = hashlib.sha256(np.ascontiguousarray(vectors).data)
    digest.update(json.dumps(metadata.to_pydict(), sort_keys=True).encode())
    return digest.hexdigest()

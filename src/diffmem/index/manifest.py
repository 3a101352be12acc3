"""The JSON manifest of a saved training-set index: what it holds and how it was built."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from diffmem.errors import DiffmemError
from diffmem.index.faiss_index import IvfPq

FORMAT = "diffmem.training_set_index"
FORMAT_VERSION = 1
PIXELS = "pixels"
EMBEDDING = "embedding"
KINDS = (PIXELS, EMBEDDING)
REBUILD = "rebuild the index with `diffmem index build`"
OPTIONAL = {"lab_config"}  # fields that indexes built before them lack


@dataclass(frozen=True)
class IndexManifest:
    """What a training-set index holds: its rows, their kind and shape, and its search structure."""

    kind: str  # "pixels" (images for nL2) or "embedding" (unit copy-detection embeddings)
    rows: int
    dim: int  # floats per row
    image_shape: tuple[int, int, int] | None  # [3, H, W] for pixels, None for embeddings
    exact: bool  # flat faiss index; otherwise IVF-PQ re-ranked exactly
    ivf_pq: IvfPq | None  # the IVF-PQ settings when not exact
    duplicated_caption_rows: int  # rows whose caption more than one training row carries
    source: str  # what was indexed, e.g. "lab dataset /data/lab"
    fingerprint: str  # sha256 of the stored vectors, ids, captions and caption counts
    encoder: str | None  # the embedding network (path and weights hash), for embeddings
    diffmem_version: str
    lab_config: dict | None = None  # the generation settings of an indexed lab dataset, else None

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise DiffmemError(f"inconsistent index manifest ({problem}); {REBUILD}")

    @property
    def structure(self) -> str:
        """The faiss structure, e.g. ``IndexFlatL2`` or ``IVF128,PQ16x8``."""
        if self.ivf_pq is None:
            return "IndexFlatIP" if self.kind == EMBEDDING else "IndexFlatL2"
        return f"IVF{self.ivf_pq.nlist},PQ{self.ivf_pq.m}x{self.ivf_pq.nbits}"

    def describe(self) -> str:
        """One line: rows, kind and shape, structure, duplicated captions."""
        what = (
            "x".join(map(str, self.image_shape)) + " images"
            if self.image_shape
            else f"{self.dim}-dim embeddings"
        )
        search = "exact" if self.exact else "approximate, re-ranked exactly"
        return (
            f"{self.rows} rows of {what}, {self.structure} ({search}), "
            f"{self.duplicated_caption_rows} rows with a duplicated caption"
        )

    def to_json(self) -> str:
        """The manifest as indented JSON, tagged with the index format and its version."""
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(record, indent=2) + "\n"


def read_manifest(path: Path) -> IndexManifest:
    """Open and check the manifest at ``path``."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DiffmemError(f"could not read the index manifest {path} ({error}); {REBUILD}") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DiffmemError(f"{path} is not a diffmem training-set index manifest; {REBUILD}")
    if record.get("format_version") != FORMAT_VERSION:
        raise DiffmemError(
            f"{path} holds index format {record.get('format_version')}, this diffmem reads {FORMAT_VERSION}; "
            f"{REBUILD}"
        )
    names = {f.name for f in fields(IndexManifest)}
    settings = {k: v for k, v in record.items() if k not in ("format", "format_version")}
    if not names - OPTIONAL <= set(settings) <= names:
        raise DiffmemError(
            f"{path} lacks or adds manifest fields ({sorted(set(settings) ^ names)}); {REBUILD}"
        )
    try:
        ivf_pq = settings.pop("ivf_pq")
        shape = settings.pop("image_shape")
        return IndexManifest(
            ivf_pq=None if ivf_pq is None else IvfPq(**ivf_pq),
            image_shape=None if shape is None else tuple(shape),
            **settings,
        )
    except TypeError as error:
        raise DiffmemError(f"{path} holds an invalid manifest ({error}); {REBUILD}") from error


def _problem(manifest: IndexManifest) -> str | None:
    """What is wrong with the manifest's fields, or None."""
    if manifest.kind not in KINDS:
        return f"kind {manifest.kind!r} is not one of {', '.join(KINDS)}"
    if not all(isinstance(v, int) and v >= 1 for v in (manifest.rows, manifest.dim)):
        return f"rows {manifest.rows!r} and dim {manifest.dim!r} must be positive integers"
    if manifest.kind == PIXELS:
        shape = manifest.image_shape
        if shape is None or len(shape) != 3 or shape[0] != 3 or math.prod(shape) != manifest.dim:
            return f"pixel rows of {manifest.dim} floats need an image shape [3, H, W]; got {shape}"
    elif manifest.image_shape is not None:
        return "embeddings have no image shape"
    if manifest.exact != (manifest.ivf_pq is None):
        return "an exact index has no IVF-PQ settings and an approximate one needs them"
    return None

"""The faiss structure behind a training-set index: exact for small sets, IVF-PQ for large ones.

Exact: ``IndexFlatL2`` (pixels) or ``IndexFlatIP`` (unit embeddings). Approximate: an inverted file of
``nlist`` coarse cells (about 4 sqrt(N), faiss' guideline) with product-quantised residuals; its
candidates are re-ranked exactly against the stored vectors by the caller, so PQ only has to put the true
neighbours among a few dozen candidates. IVF-PQ always ranks by L2, which orders unit embeddings as the
inner product does (``||a - b||^2 = 2 - 2 <a, b>``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from diffmem.errors import DiffmemError

EXACT_MAX_BYTES = 1 << 30  # exact search while the float32 vectors take at most 1 GiB
IVF_MIN_ROWS = 1000  # fewer rows cannot train the PQ codebooks (256 centroids each) and the cells
PQ_MAX_SUBQUANTIZERS = 64  # code size in bytes per vector
PQ_NBITS = 8
TRAIN_ROWS_PER_CELL = 64  # training sample: 64 rows a coarse cell (faiss asks for 39 to 256),
TRAIN_MIN_ROWS = 65_536  # and at least 256 a PQ centroid, or every row when there are fewer
ADD_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class IvfPq:
    """Settings of an IVF-PQ index."""

    nlist: int  # coarse cells
    m: int  # PQ sub-quantizers; divides the dimension
    nbits: int  # bits per sub-quantizer code
    nprobe: int  # cells visited per query

    @classmethod
    def for_size(cls, rows: int, dim: int) -> IvfPq:
        """Settings for ``rows`` vectors of ``dim`` floats; needs at least ``IVF_MIN_ROWS`` rows."""
        if rows < IVF_MIN_ROWS:
            raise DiffmemError(
                f"IVF-PQ needs at least {IVF_MIN_ROWS} rows to train its codebooks; got {rows}: "
                "build an exact index (exact=True, --exact)"
            )
        nlist = max(1, min(int(4 * math.sqrt(rows)), rows // 39))  # faiss wants >= 39 training rows a cell
        m = max(d for d in range(1, min(PQ_MAX_SUBQUANTIZERS, max(1, dim // 4)) + 1) if dim % d == 0)
        return cls(nlist=nlist, m=m, nbits=PQ_NBITS, nprobe=min(nlist, max(16, nlist // 8)))


def choose_exact(rows: int, dim: int) -> bool:
    """Exact search while the vectors fit in ``EXACT_MAX_BYTES`` or are too few to train IVF-PQ."""
    return rows * dim * 4 <= EXACT_MAX_BYTES or rows < IVF_MIN_ROWS


def build_faiss_index(vectors: np.ndarray, inner_product: bool, ivf_pq: IvfPq | None) -> faiss.Index:
    """A faiss index over ``vectors`` [N, D] float32: flat (exact) when ``ivf_pq`` is None, else IVF-PQ."""
    dim = vectors.shape[1]
    if ivf_pq is None:
        index = faiss.IndexFlatIP(dim) if inner_product else faiss.IndexFlatL2(dim)
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, ivf_pq.nlist, ivf_pq.m, ivf_pq.nbits)
        index.pq.cp.min_points_per_centroid = (
            1  # small sets give PQ few rows a centroid; re-ranking absorbs it
        )
        sample = max(TRAIN_ROWS_PER_CELL * ivf_pq.nlist, TRAIN_MIN_ROWS)
        rows = np.random.default_rng(0).permutation(len(vectors))[:sample]
        index.train(np.ascontiguousarray(vectors[np.sort(rows)]))
        index.nprobe = ivf_pq.nprobe
    for start in range(0, len(vectors), ADD_BATCH_ROWS):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_BATCH_ROWS]))
    return index


def read_faiss_index(path: Path, exact: bool) -> faiss.Index:
    """Open a faiss index file memory-mapped (flat codes or inverted lists stay on disk until touched)."""
    flags = faiss.IO_FLAG_MMAP_IFC if exact else faiss.IO_FLAG_MMAP
    if not path.is_file():
        raise DiffmemError(f"{path} is missing: rebuild the index with `diffmem index build`")
    try:
        return faiss.read_index(str(path), flags | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as error:
        reason = re.sub(
            r"^Error in .* at \S+:\d+: ", "", " ".join(str(error).split())
        )  # drop faiss' C++ location
        raise DiffmemError(
            f"{path} is not a readable faiss index ({reason}): rebuild the index with `diffmem index build`"
        ) from error


def search_all_cells(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    """[B, k] rows of an IVF index's k nearest, visiting every cell (for queries whose cells held < k)."""
    return index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=index.nlist))[1]

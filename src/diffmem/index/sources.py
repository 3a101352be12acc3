"""Training sets an index can be built from: a lab dataset, any training set :mod:`diffmem.data` reads
(image folder, saved ``datasets`` dataset, WebDataset shards), clip-retrieval embeddings.

Image sources list each distinct training image once, with its most frequent caption and how many
training rows carry that caption (``captions.most_frequent_captions``), and read the images in batches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from diffmem.data import Row, RowReport, TrainingData, read_training_data
from diffmem.data.lab_rows import is_lab_dataset
from diffmem.errors import DiffmemError
from diffmem.index.captions import caption_counts, most_frequent_captions
from diffmem.lab.dataset import load_lab_dataset


@dataclass(frozen=True)
class ImageSource:
    """Distinct training images with one caption each, read in batches."""

    description: str  # e.g. "lab dataset /data/lab"
    ids: list[int]  # per image: its id in the source (scene id, first metadata row)
    captions: list[str]  # per image: its most frequent caption
    caption_counts: list[int]  # per image: training rows carrying exactly that caption
    read: Callable[[Sequence[int]], torch.Tensor]  # positions in ``ids`` -> images [n, 3, H, W] in [0, 1]
    lab_config: dict | None = None  # a lab dataset's generation settings
    data_report: RowReport | None = None  # the rows read and those skipped, for a source other than the lab's

    def batches(self, batch_size: int = 256, progress: bool = True) -> Iterator[torch.Tensor]:
        """All images in order, ``batch_size`` at a time, float [n, 3, H, W] in [0, 1]."""
        starts = range(0, len(self.ids), batch_size)
        for start in tqdm(starts, desc="training images", unit="batch", disable=not progress):
            yield self.read(range(start, min(start + batch_size, len(self.ids))))


@dataclass(frozen=True)
class EmbeddingSource:
    """Precomputed training-image embeddings with their captions."""

    description: str
    embeddings: np.ndarray  # [N, D] float32
    ids: list[int]  # global row numbers
    captions: list[str]
    caption_counts: list[int]


def image_source(data: Path | str, caption_column: str | None = None) -> ImageSource:
    """The lab dataset at ``data``, or any other training set :func:`~diffmem.data.read_training_data`
    reads (image folder, saved ``datasets`` dataset, WebDataset shards)."""
    if is_lab_dataset(Path(data)):
        if caption_column is not None:
            raise DiffmemError("a lab dataset's captions are its caption column: drop --caption-column")
        return lab_source(Path(data))
    return training_data_source(read_training_data(data, caption_column, require_captions=False))


def lab_source(directory: Path) -> ImageSource:
    """Every training scene of a lab dataset once, by ascending scene id."""
    lab = load_lab_dataset(directory)
    chosen = most_frequent_captions(
        lab.train.column("scene_id").to_pylist(), lab.train.column("caption").to_pylist()
    )
    ids = sorted(chosen)
    return ImageSource(
        description=f"lab dataset {Path(directory).resolve()}",
        ids=ids,
        captions=[chosen[i][0] for i in ids],
        caption_counts=[chosen[i][1] for i in ids],
        read=lambda positions: lab.images([ids[p] for p in positions]),
        lab_config=asdict(lab.config),
    )


def training_data_source(data: TrainingData) -> ImageSource:
    """The distinct images of a training set's usable rows, in order of first appearance; an image's id
    is the number of its first row. Empty captions count as captions. All images must have one size."""
    rows = data.unique_images()
    chosen = most_frequent_captions([row.key for row in data.rows], [row.caption for row in data.rows])
    size = rows[0].load().size
    return ImageSource(
        description=data.description,
        ids=[row.number for row in rows],
        captions=[chosen[row.key][0] for row in rows],
        caption_counts=[chosen[row.key][1] for row in rows],
        read=lambda positions: _read_images([rows[p] for p in positions], size),
        data_report=data.report,
    )


def _read_images(rows: Sequence[Row], size: tuple[int, int]) -> torch.Tensor:
    """float [n, 3, H, W] in [0, 1]; every image must be ``size`` (width, height)."""
    arrays = []
    for row in rows:
        image = row.load()
        if image.size != size:
            raise DiffmemError(
                f"{row.key} is {image.size[0]}x{image.size[1]}, the first image {size[0]}x{size[1]}: "
                "resize the images to one size (the model's resolution) first"
            )
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)


def clip_retrieval_source(directory: Path) -> EmbeddingSource:
    """clip-retrieval's output: ``img_emb/img_emb_{i}.npy`` [n_i, D] and ``metadata/metadata_{i}.parquet``
    (a ``caption`` column, one row per embedding, same order), shards concatenated by ascending i.

    Null captions count as empty captions.
    """
    directory = Path(directory)
    embedding_files = _shards(directory / "img_emb", "img_emb_", ".npy")
    metadata_files = _shards(directory / "metadata", "metadata_", ".parquet")
    if not embedding_files:
        raise DiffmemError(
            f"no img_emb/img_emb_*.npy in {directory}: point --embeddings at clip-retrieval's output folder"
        )
    if list(embedding_files) != list(metadata_files):
        raise DiffmemError(
            f"{directory}: embedding shards {list(embedding_files)} and metadata shards "
            f"{list(metadata_files)} differ: every img_emb_{{i}}.npy needs its metadata_{{i}}.parquet"
        )
    arrays, captions = [], []
    for shard, path in embedding_files.items():
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise DiffmemError(f"could not read {path} ({error})") from error
        shard_captions = _read_parquet(metadata_files[shard], ["caption"]).column("caption").to_pylist()
        if array.ndim != 2 or len(array) != len(shard_captions):
            raise DiffmemError(
                f"{path} holds {array.shape}, its metadata {len(shard_captions)} rows: "
                "each shard needs one 2-D embedding row per metadata row"
            )
        arrays.append(array)
        captions += [text or "" for text in shard_captions]
    if len({array.shape[1] for array in arrays}) > 1:
        raise DiffmemError(
            f"{directory}: embedding shards differ in dimension ({[a.shape[1] for a in arrays]})"
        )
    return EmbeddingSource(
        description=f"clip-retrieval embeddings {directory.resolve()}",
        embeddings=np.concatenate(arrays, dtype=np.float32),
        ids=list(range(len(captions))),
        captions=captions,
        caption_counts=caption_counts(captions),
    )


def _shards(folder: Path, prefix: str, suffix: str) -> dict[str, Path]:
    """``{prefix}{i}{suffix}`` files in ``folder`` by their shard name i, shorter names first."""
    pattern = re.compile(re.escape(prefix) + r"(.+)" + re.escape(suffix) + "$")
    found = {m.group(1): p for p in folder.glob(f"{prefix}*{suffix}") if (m := pattern.match(p.name))}
    return dict(sorted(found.items(), key=lambda item: (len(item[0]), item[0])))  # 2 before 10


def _read_parquet(path: Path, columns: list[str]) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise DiffmemError(f"could not read {path} ({error})") from error
    absent = [name for name in columns if name not in table.column_names]
    if absent:
        raise DiffmemError(
            f"{path} has no {', '.join(absent)} column; it has {', '.join(table.column_names)}"
        )
    return table.select(columns)

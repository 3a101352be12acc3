"""Training sets an index can be built from: a lab dataset, an image folder, clip-retrieval embeddings.

Image sources list each distinct training image once, with its most frequent caption and how many
training rows carry that caption (``captions.most_frequent_captions``), and read the images in batches.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffmem.errors import DiffmemError
from diffmem.index.captions import caption_counts, most_frequent_captions
from diffmem.lab.dataset import load_lab_dataset

FOLDER_METADATA = "metadata.parquet"


@dataclass(frozen=True)
class ImageSource:
    """Distinct training images with one caption each, read in batches."""

    description: str  # e.g. "lab dataset /data/lab"
    ids: list[int]  # per image: its id in the source (scene id, first metadata row)
    captions: list[str]  # per image: its most frequent caption
    caption_counts: list[int]  # per image: training rows carrying exactly that caption
    read: Callable[[Sequence[int]], torch.Tensor]  # positions in ``ids`` -> images [n, 3, H, W] in [0, 1]
    lab_config: dict | None = None  # a lab dataset's generation settings

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


def image_source(directory: Path) -> ImageSource:
    """The lab dataset (``config.json``) or image folder (``metadata.parquet``) at ``directory``."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return lab_source(directory)
    if (directory / FOLDER_METADATA).is_file():
        return image_folder_source(directory)
    raise DiffmemError(
        f"{directory} is neither a lab dataset (config.json) nor an image folder with {FOLDER_METADATA} "
        "(columns file_name, caption): point DATA at one, or pass --embeddings for clip-retrieval output"
    )


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


def image_folder_source(directory: Path) -> ImageSource:
    """The images of a folder whose ``metadata.parquet`` has one row per (``file_name``, ``caption``).

    Images are listed in order of first appearance; an image's id is the row of its first appearance.
    Null captions count as empty captions. All images must have one size.
    """
    directory = Path(directory)
    table = _read_parquet(directory / FOLDER_METADATA, ["file_name", "caption"])
    names = table.column("file_name").to_pylist()
    bad = next((row for row, name in enumerate(names) if not isinstance(name, str)), None)
    if bad is not None:
        raise DiffmemError(
            f"{directory / FOLDER_METADATA}: file_name of row {bad} is {names[bad]!r}, not a path"
        )
    leaving = next((name for name in names if _leaves_folder(name)), None)
    if leaving is not None:
        raise DiffmemError(
            f"{directory / FOLDER_METADATA} names {leaving!r}, outside the folder: every file_name must be "
            "a relative path inside it (no absolute paths, no '..')"
        )
    captions = [text or "" for text in table.column("caption").to_pylist()]
    chosen = most_frequent_captions(names, captions)
    files = list(chosen)
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise DiffmemError(
            f"{directory / FOLDER_METADATA} names {len(missing)} files that are not in {directory} "
            f"(first: {missing[0]}): file_name is a path relative to the folder"
        )
    first_row: dict[str, int] = {}
    for row, name in enumerate(names):
        first_row.setdefault(name, row)
    with Image.open(directory / files[0]) as first:
        size = first.size
    return ImageSource(
        description=f"image folder {directory.resolve()}",
        ids=[first_row[name] for name in files],
        captions=[chosen[name][0] for name in files],
        caption_counts=[chosen[name][1] for name in files],
        read=lambda positions: _read_images([directory / files[p] for p in positions], size),
    )


def _leaves_folder(name: str) -> bool:
    """Whether a metadata ``file_name`` points outside its folder (absolute, or up through '..')."""
    normal = os.path.normpath(name)
    return os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep) or "\0" in name


def _read_images(paths: Sequence[Path], size: tuple[int, int]) -> torch.Tensor:
    """float [n, 3, H, W] in [0, 1]; every image must be ``size`` (width, height)."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            if image.size != size:
                raise DiffmemError(
                    f"{path} is {image.size[0]}x{image.size[1]}, the folder's first image "
                    f"{size[0]}x{size[1]}: resize the images to one size (the model's resolution) first"
                )
            arrays.append(np.asarray(image.convert("RGB")))
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

"""Any training set a command takes, by its layout: a lab dataset, an image folder, a saved ``datasets``
dataset, WebDataset shards, or a Hub dataset id in the local cache."""

from __future__ import annotations

from pathlib import Path

from diffmem.data.hf_dataset import is_saved_dataset, read_cached_dataset, read_saved_dataset
from diffmem.data.image_folder import image_files, metadata_file, read_image_folder
from diffmem.data.lab_rows import is_lab_dataset, read_lab_rows
from diffmem.data.rows import TrainingData
from diffmem.data.webdataset import read_shards, shard_files
from diffmem.errors import DiffmemError

LAYOUTS = (
    "a lab dataset (config.json), an image folder (metadata.jsonl, .csv or .parquet with file_name and a "
    "caption column), a datasets save_to_disk folder, WebDataset .tar shards, or a cached Hub dataset id"
)


def read_training_data(
    data: Path | str,
    caption_column: str | None = None,
    split: str | None = None,
    require_captions: bool = True,
) -> TrainingData:
    """The usable rows of the training set at ``data`` and the report of the rows that are not.

    ``caption_column`` names the caption column (default ``text``, else ``caption``; for shards, the
    caption file's extension, default ``txt``); ``split`` a ``datasets`` split (default ``train``).
    Without ``require_captions`` empty captions are usable. Every image is opened once to check it reads.
    """
    path = Path(data)
    if split is not None and path.exists() and not is_saved_dataset(path):
        raise DiffmemError(
            f"--split picks a split of a saved datasets dataset; {path} is not one: drop --split"
        )
    if path.is_dir() and is_lab_dataset(path):
        if caption_column not in (None, "caption"):
            raise DiffmemError("a lab dataset's captions are its caption column: drop --caption-column")
        return read_lab_rows(path, require_captions)
    if path.is_dir() and is_saved_dataset(path):
        return read_saved_dataset(path, caption_column, split, require_captions)
    if path.is_dir() and (metadata_file(path) is not None or next(image_files(path), None) is not None):
        return read_image_folder(path, caption_column, require_captions)  # without metadata: says so
    if path.exists() and shard_files(path):
        return read_shards(path, caption_column, require_captions)
    if not path.exists() and _looks_like_hub_id(str(data)):
        return read_cached_dataset(str(data), caption_column, split, require_captions)
    found = "does not exist" if not path.exists() else "is none of them"
    raise DiffmemError(f"{data} {found}: training data is {LAYOUTS}")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))

"""A Hugging Face ``datasets`` dataset: a folder written by ``save_to_disk``, or a Hub id already in the
local cache (never downloaded).

Rows need an ``Image`` column; captions come from a text column. Images are read from the dataset's
memory-mapped Arrow files when a row is opened.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from diffmem.data.rows import Listed, RowReport, TrainingData, caption_column, checked
from diffmem.errors import DiffmemError

SAVED_MARKERS = (
    "dataset_dict.json",
    "state.json",
)  # what save_to_disk writes at a DatasetDict's / Dataset's top
DEFAULT_SPLIT = "train"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return any((Path(path) / marker).is_file() for marker in SAVED_MARKERS)


def read_saved_dataset(
    path: Path,
    caption_column_name: str | None = None,
    split: str | None = None,
    require_captions: bool = True,
) -> TrainingData:
    """The rows of the ``save_to_disk`` folder at ``path``, checked, with the report of those that fail."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as error:
        raise DiffmemError(f"could not read the saved dataset {path} ({error})") from error
    chosen = _split(loaded, split, str(path))
    return _read(chosen, f"saved dataset {Path(path).resolve()}", caption_column_name, require_captions)


def read_cached_dataset(
    name: str, caption_column_name: str | None = None, split: str | None = None, require_captions: bool = True
) -> TrainingData:
    """The rows of the Hub dataset ``name`` as the local cache holds it, checked; never downloads."""
    import datasets

    with _offline(datasets):
        try:
            loaded = datasets.load_dataset(name)
        except Exception as error:  # datasets raises many kinds for a dataset that is not there
            raise DiffmemError(
                f"{name} is neither a folder nor a dataset in the local Hugging Face cache "
                f"({' '.join(str(error).split())}); "
                "diffmem never downloads: save it with datasets' save_to_disk and pass that folder"
            ) from error
    return _read(
        _split(loaded, split, name), f"Hub dataset {name} (cached)", caption_column_name, require_captions
    )


@contextmanager
def _offline(datasets) -> Iterator[None]:
    """``datasets`` with Hub access off, as if HF_HUB_OFFLINE were set."""
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _split(loaded, split: str | None, where: str):
    """The chosen split of a DatasetDict (default ``train``, or its only split); a Dataset as it is."""
    if not hasattr(loaded, "keys"):
        if split is not None:
            raise DiffmemError(f"{where} is a single dataset, not splits: drop --split")
        return loaded
    names = list(loaded.keys())
    if split is None:
        split = DEFAULT_SPLIT if DEFAULT_SPLIT in names or len(names) != 1 else names[0]
    if split not in names:
        raise DiffmemError(f"{where} has no split {split!r} (it has {', '.join(names)}): pass --split")
    return loaded[split]


def _read(dataset, description: str, caption_column_name: str | None, require_captions: bool) -> TrainingData:
    import datasets

    images = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    columns = list(dataset.column_names)
    if not images:
        raise DiffmemError(
            f"{description} has no Image column (it has {', '.join(columns)}): cast the image column to "
            "datasets.Image before save_to_disk"
        )
    column = caption_column(columns, caption_column_name, description, require_captions)
    raw = dataset.select_columns([images[0]]).cast_column(images[0], datasets.Image(decode=False))
    captions = dataset[column] if column else [None] * len(raw)
    listed = [
        Listed(str(number), caption, _loader(raw, images[0], number))
        for number, caption in enumerate(captions)
    ]
    return checked(listed, RowReport(description, column), require_captions)


def _loader(dataset, column: str, number: int) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        value = dataset[number][column] or {}
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        if source is None:
            raise FileNotFoundError(f"row {number} has no image")
        with Image.open(source) as image:
            return image.convert("RGB")

    return load

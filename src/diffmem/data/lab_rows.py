"""A lab dataset's training rows (``diffmem lab build``), read like any other training set."""

from __future__ import annotations

from pathlib import Path

from diffmem.data.rows import ImageFile, Listed, RowReport, TrainingData, checked
from diffmem.lab.dataset import load_lab_dataset


def is_lab_dataset(path: Path) -> bool:
    """Whether ``path`` is a lab dataset folder (it has ``config.json``)."""
    return (Path(path) / "config.json").is_file()


def read_lab_rows(directory: Path, require_captions: bool = True) -> TrainingData:
    """The lab dataset's training rows in row order, keyed by image path, checked."""
    directory = Path(directory)
    train = load_lab_dataset(directory).train
    listed = [
        Listed(name, text, ImageFile(str(directory / name)))
        for name, text in zip(
            train.column("image").to_pylist(), train.column("caption").to_pylist(), strict=True
        )
    ]
    return checked(listed, RowReport(f"lab dataset {directory.resolve()}", "caption"), require_captions)

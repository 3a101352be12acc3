"""An image folder in the Hugging Face ``imagefolder`` convention: images anywhere below the folder and one
metadata file at its top (``metadata.jsonl``, ``metadata.csv`` or ``metadata.parquet``) with a
``file_name`` column (a path relative to the folder) and a caption column.

Each metadata row is a training row; rows may repeat a ``file_name`` with other captions. Images that no
metadata row names are reported too, so that nothing in the folder goes unmentioned.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from diffmem.data.rows import ImageFile, Listed, RowReport, TrainingData, caption_column, checked
from diffmem.errors import DiffmemError

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# why a metadata row is not used, beside the checks every row passes
NO_FILE_NAME = "no file_name"
OUTSIDE_FOLDER = "file outside the folder"
NOT_JSON = "metadata line not JSON"
NOT_IN_METADATA = "image not in metadata"


def metadata_file(directory: Path) -> Path | None:
    """The folder's metadata file; None when it has none."""
    found = [directory / name for name in METADATA_FILES if (directory / name).is_file()]
    if len(found) > 1:
        raise DiffmemError(f"{directory} holds {' and '.join(p.name for p in found)}: keep one metadata file")
    return found[0] if found else None


def read_image_folder(
    directory: Path, caption_column_name: str | None = None, require_captions: bool = True
) -> TrainingData:
    """The rows of the image folder at ``directory``, checked, with the report of those that fail."""
    directory = Path(directory)
    path = metadata_file(directory)
    if path is None:
        raise DiffmemError(
            f"{directory} has no {', '.join(METADATA_FILES[:-1])} or {METADATA_FILES[-1]}: an image folder "
            "needs one, with a file_name column and a caption column"
        )
    records, unparsed = _records(path)
    if not records:
        unreadable = f" ({len(unparsed)} lines are not JSON objects)" if unparsed else ""
        raise DiffmemError(f"{path} lists no rows{unreadable}: write one row per image and caption")
    columns = list(dict.fromkeys(name for record in records for name in record))
    if "file_name" not in columns:
        raise DiffmemError(f"{path} has no file_name column (it has {', '.join(columns)})")
    column = caption_column(columns, caption_column_name, str(path), require_captions)
    report = RowReport(f"image folder {directory.resolve()}", column)
    named = {_normal(record.get("file_name")) for record in records}
    listed = chain(
        (_listed(directory, record, column) for record in records),
        (Listed(f"line {line}", None, None, NOT_JSON) for line in unparsed),
        (Listed(name, None, None, NOT_IN_METADATA) for name in image_files(directory) if name not in named),
    )
    return checked(listed, report, require_captions)


def _listed(directory: Path, record: dict, column: str | None) -> Listed:
    name = record.get("file_name")
    caption = record.get(column) if column else None
    if not isinstance(name, str) or not name:
        return Listed(repr(name), caption, None, NO_FILE_NAME)
    if _leaves_folder(name):
        return Listed(name, caption, None, OUTSIDE_FOLDER)
    path = os.path.join(directory, name)
    return Listed(name, caption, ImageFile(path) if os.path.isfile(path) else None, None)


def _records(path: Path) -> tuple[list[dict], list[int]]:
    """The metadata file's rows as dictionaries, and the line numbers of JSON lines that do not parse.

    Text files are read with ``surrogateescape`` so that a caption that is not UTF-8 spoils its row only.
    """
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist(), []
        except (OSError, pa.ArrowInvalid) as error:
            raise DiffmemError(f"could not read {path} ({error})") from error
    try:
        text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")  # a BOM is dropped
    except OSError as error:
        raise DiffmemError(f"could not read {path} ({error})") from error
    if path.suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text, newline=""))), []
        except csv.Error as error:
            raise DiffmemError(f"could not read {path} as CSV ({error})") from error
    records, unparsed = [], []
    for line, content in enumerate(text.split("\n"), start=1):  # JSON strings may hold U+2028
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            unparsed.append(line)
    return records, unparsed


def image_files(directory: Path) -> Iterator[str]:
    """Paths, relative to ``directory`` with ``/``, of the image files below it."""
    found = []
    for folder, _, files in os.walk(directory):
        inside = Path(folder).relative_to(directory).as_posix()
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(name if inside == "." else f"{inside}/{name}")
    yield from sorted(found, key=lambda name: name.split("/"))


def _normal(name: object) -> object:
    """A metadata ``file_name`` as the folder walk spells it (``./a.png`` is ``a.png``)."""
    return Path(os.path.normpath(name)).as_posix() if isinstance(name, str) and name else name


def _leaves_folder(name: str) -> bool:
    """Whether a metadata ``file_name`` points outside its folder (absolute, or up through '..')."""
    normal = os.path.normpath(name)
    return os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep) or "\0" in name

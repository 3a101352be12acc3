"""Training rows as every source lists them, the checks each row passes, and the report of those that fail.

A row is one (key, image, caption) of a training set: a metadata row of an image folder, a sample of a
WebDataset shard, a row of a ``datasets`` dataset. A row that cannot be used (its image missing or
unreadable, its caption empty or not UTF-8) is counted under its reason, never fatal and never dropped
unseen; the report says how many rows each reason took and names the first few.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from diffmem.errors import DiffmemError
from diffmem.io.atomic import write_json_atomic

EXAMPLES_PER_REASON = 5
# why a row is not used
MISSING_FILE = "missing file"
UNREADABLE_IMAGE = "unreadable image"
EMPTY_CAPTION = "empty caption"
CAPTION_NOT_UTF8 = "caption not UTF-8"
CAPTION_NOT_TEXT = "caption not text"


@dataclass(frozen=True, slots=True)
class Listed:
    """A row as its source lists it, before it is checked."""

    key: str  # names the row's image in its source; rows sharing a key share an image
    caption: object  # str, bytes or whatever the source holds
    load: Callable[[], Image.Image] | None  # opens the image; None when ``problem`` says why there is none
    problem: str | None = None  # what the source already found wrong with the row


@dataclass(frozen=True, slots=True)
class Row:
    """A usable training row: its image's key, its caption, and how to open its image."""

    key: str
    caption: str
    load: Callable[[], Image.Image]  # the image as RGB, opened anew on each call
    number: int  # the row's place among everything its source lists, from 0


@dataclass
class RowReport:
    """How many rows a source listed, how many are usable, and how many each problem took."""

    source: str
    caption_column: str | None = None
    usable: int = 0
    uncaptioned: int = 0  # usable rows with an empty caption, where captions are not required
    bad: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Every row the source listed: usable ones and bad ones."""
        return self.usable + sum(self.bad.values())

    def count_bad(self, reason: str, key: str) -> None:
        """Count one unusable row under ``reason``; the first few keys are kept as examples."""
        self.bad[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(key)

    def summary(self) -> str:
        """One line: rows usable of listed, and each problem's count."""
        column = f", captions from {self.caption_column!r}" if self.caption_column else ""
        line = f"{self.source}: {self.usable} of {self.rows} rows usable{column}"
        if self.uncaptioned:
            line += f" ({self.uncaptioned} without a caption, kept)"
        if self.bad:
            line += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.bad.items()))
        return line

    def to_dict(self) -> dict:
        """The report as JSON-ready values."""
        return {
            "source": self.source,
            "caption_column": self.caption_column,
            "rows": self.rows,
            "usable": self.usable,
            "uncaptioned": self.uncaptioned,
            "bad": dict(sorted(self.bad.items())),
            "examples": {reason: self.examples[reason] for reason in sorted(self.examples)},
        }

    def save(self, path: Path) -> Path:
        """Write the report as JSON to ``path``."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path


@dataclass(frozen=True)
class TrainingData:
    """The usable rows of a training set, and the report of what was read."""

    rows: list[Row]
    report: RowReport

    @property
    def description(self) -> str:
        return self.report.source

    def unique_images(self) -> list[Row]:
        """The first usable row of each image key, in order."""
        first: dict[str, Row] = {}
        for row in self.rows:
            first.setdefault(row.key, row)
        return list(first.values())


def checked(listed: Iterable[Listed], report: RowReport, require_captions: bool = True) -> TrainingData:
    """The rows of ``listed`` that pass every check, each numbered by its place in ``listed``; the others
    counted in ``report`` under their first problem. Opens every image once to know it reads.

    Without ``require_captions``, empty captions are usable (as ``""``) and counted as uncaptioned.
    """
    rows = []
    for number, entry in enumerate(listed):
        caption, problem = _caption(entry.caption, require_captions)
        problem = entry.problem or problem or _image_problem(entry.load)
        if problem:
            report.count_bad(problem, entry.key)
        else:
            report.usable += 1
            report.uncaptioned += not caption.strip()
            rows.append(Row(entry.key, caption, entry.load, number))
    if not rows:
        raise DiffmemError(f"no usable training row in {report.summary()}")
    return TrainingData(rows, report)


def caption_column(
    columns: Sequence[str], chosen: str | None, where: str, required: bool = True
) -> str | None:
    """The caption column: ``chosen``, else ``text``, else ``caption``; None when none is there and
    captions are not ``required``."""
    if chosen is not None:
        if chosen not in columns:
            raise DiffmemError(
                f"{where} has no {chosen!r} column (it has {', '.join(columns) or 'none'}): "
                "pass one of those to --caption-column"
            )
        return chosen
    found = next((name for name in ("text", "caption") if name in columns), None)
    if found is None and required:
        raise DiffmemError(
            f"{where} has neither a 'text' nor a 'caption' column (it has {', '.join(columns) or 'none'}): "
            "pass the caption column with --caption-column"
        )
    return found


def open_rgb(opener: Callable[[], object]) -> Callable[[], Image.Image]:
    """A loader that opens the file or stream ``opener`` returns as an RGB image, fully read."""

    def load() -> Image.Image:
        return _rgb(opener())

    return load


@dataclass(frozen=True, slots=True)
class ImageFile:
    """A loader of the image file at ``path`` as RGB, fully read; it holds only the path, so that a
    training set's loaders cost little beside its rows."""

    path: str

    def __call__(self) -> Image.Image:
        return _rgb(self.path)


def _rgb(source: object) -> Image.Image:
    """The image in the file or stream ``source`` as RGB, fully read."""
    with Image.open(source) as image:
        return image.convert("RGB")


def _caption(value: object, required: bool) -> tuple[str, str | None]:
    """The caption as text, and its problem if it has one."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return "", CAPTION_NOT_UTF8
    if value is None:
        value = ""
    if not isinstance(value, str):
        return "", CAPTION_NOT_TEXT
    try:
        value.encode("utf-8")  # bytes read with surrogateescape come back as lone surrogates
    except UnicodeEncodeError:
        return "", CAPTION_NOT_UTF8
    if required and not value.strip():
        return value, EMPTY_CAPTION
    return value, None


def _image_problem(load: Callable[[], Image.Image] | None) -> str | None:
    if load is None:
        return MISSING_FILE
    try:
        load()
    except FileNotFoundError:
        return MISSING_FILE
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return UNREADABLE_IMAGE
    return None

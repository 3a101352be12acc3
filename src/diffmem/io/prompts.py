"""Read prompt lists from txt (one per line), jsonl, csv or parquet files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet

from diffmem.errors import DiffmemError

READERS = {
    ".jsonl": pyarrow.json.read_json,
    ".csv": pyarrow.csv.read_csv,
    ".parquet": pyarrow.parquet.read_table,
}


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a file, with its id and whether it can be scored as read."""

    prompt_id: int
    prompt: str
    status: str  # "ok", "empty", "not_utf8" (decoded with replacement characters) or "missing" (null)


def encoding_problem(text: str) -> str | None:
    """Why ``text`` cannot be given to a tokenizer (a lone surrogate: undecodable bytes taken into a
    Python string, or a JSON ``\\ud800`` escape), or None when it is valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"it holds undecodable character {text[error.start]!a} at position {error.start}"
    return None


def read_prompts(path: Path, column: str = "prompt") -> list[str]:
    """The prompts in a file; for tabular files, the values of ``column``. Blank txt lines are skipped."""
    records = read_prompt_records(path, column)
    bad = next((r for r in records if r.status not in ("ok", "empty")), None)
    if bad is not None:
        raise DiffmemError(f"{path.name}: prompt {bad.prompt_id} is {bad.status.replace('_', '-')}")
    return [r.prompt for r in records]


def read_prompt_records(
    path: Path, column: str = "prompt", id_column: str | None = None
) -> list[PromptRecord]:
    """Every prompt of a file as a record; ids are txt line numbers (from 0), tabular row numbers or the
    values of ``id_column``. Unreadable rows are kept with their status, never dropped; blank txt lines
    are skipped. Duplicate ids are an error.
    """
    if not path.is_file():
        raise DiffmemError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if id_column is not None:
            raise DiffmemError("a .txt prompt file has no columns; drop the id column option")
        records = _text_records(path.read_bytes())
    elif suffix in READERS:
        records = _table_records(path, column, id_column)
    else:
        raise DiffmemError(f"unsupported prompt file {path.name}; use .txt, .jsonl, .csv or .parquet")
    _check_unique_ids(path, records)
    return records


def _text_records(data: bytes) -> list[PromptRecord]:
    records = []
    for number, raw in enumerate(
        data.removeprefix(b"\xef\xbb\xbf").splitlines()
    ):  # a byte-order mark is no text
        line, ok = _decoded(raw)
        if line.strip():
            records.append(PromptRecord(number, line.strip(), "ok" if ok else "not_utf8"))
    return records


def _decoded(raw: bytes) -> tuple[str, bool]:
    """The text of UTF-8 bytes and True, or the text with U+FFFD for each undecodable byte and False."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), False


def _table_records(path: Path, column: str, id_column: str | None) -> list[PromptRecord]:
    try:
        table: pa.Table = READERS[path.suffix.lower()](path)
    except (pa.ArrowException, OSError) as error:
        raise DiffmemError(f"could not read {path}: {str(error).splitlines()[0]}") from None
    try:
        names = table.column_names
    except UnicodeDecodeError:
        raise DiffmemError(f"{path.name}: a column name is not UTF-8 text; fix the header") from None
    for name in (column, id_column):
        if name is not None and name not in names:
            raise DiffmemError(f"{path.name} has no column {name!r}; columns: {', '.join(names)}")
    prompts = _cells(table.column(column))
    if id_column is None:
        ids = list(range(len(prompts)))
    else:
        ids = table.column(id_column).to_pylist()
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise DiffmemError(f"{path.name}: column {id_column!r} must hold non-negative integers")
    records = []
    for prompt_id, prompt in zip(ids, prompts):
        if prompt is None:
            records.append(PromptRecord(prompt_id, "", "missing"))
        elif not isinstance(prompt, bytes):
            raise DiffmemError(
                f"{path.name}: column {column!r} is not text (row id {prompt_id}: {prompt!r:.80})"
            )
        else:
            text, ok = _decoded(prompt)
            records.append(
                PromptRecord(prompt_id, text, "not_utf8" if not ok else "ok" if text.strip() else "empty")
            )
    return records


def _cells(column: pa.ChunkedArray) -> list:
    """A column's values; text as raw bytes (decoded row by row, so one bad row spoils no other)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.large_binary()).to_pylist()
    return column.to_pylist()


def _check_unique_ids(path: Path, records: list[PromptRecord]) -> None:
    seen: set[int] = set()
    for record in records:
        if record.prompt_id in seen:
            raise DiffmemError(f"{path.name}: duplicate prompt id {record.prompt_id}")
        seen.add(record.prompt_id)

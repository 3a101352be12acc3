"""Read prompt lists from txt (one per line), jsonl, csv or parquet files."""

from __future__ import annotations

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


def read_prompts(path: Path, column: str = "prompt") -> list[str]:
    """The prompts in a file; for tabular files, the values of ``column``. Blank txt lines are skipped."""
    if not path.is_file():
        raise DiffmemError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix not in READERS:
        raise DiffmemError(f"unsupported prompt file {path.name}; use .txt, .jsonl, .csv or .parquet")
    try:
        table: pa.Table = READERS[suffix](path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DiffmemError(f"could not read {path}: {error}") from error
    if column not in table.column_names:
        raise DiffmemError(f"{path.name} has no column {column!r}; columns: {', '.join(table.column_names)}")
    prompts = table.column(column).to_pylist()
    missing = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if missing:
        raise DiffmemError(f"{path.name}: row {missing[0]} of column {column!r} is not text")
    return prompts

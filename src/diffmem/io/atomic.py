"""Files that readers see whole or not at all: a result is never half-written, even when killed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from diffmem.errors import DiffmemError


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o644)  # mkstemp makes the file private; results are meant to be read
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, record: object) -> None:
    """``record`` as indented JSON (non-JSON values as strings), written with :func:`write_atomic`."""
    write_atomic(path, (json.dumps(record, indent=2, default=str) + "\n").encode())


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """A Parquet table written with :func:`write_atomic`."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_atomic(path, buffer.getvalue().to_pybytes())


def read_json(path: Path, what: str) -> object:
    """The JSON document at ``path``; a missing or unreadable file is an error naming ``what`` it should be."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DiffmemError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DiffmemError(f"{path} is not a {what}: {error}") from None

"""Where a command may write: a new or empty directory or file, or, with ``overwrite``, one that holds an
earlier result of the same command. Nothing else is replaced, and nothing is removed before the new
result is ready to be written."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from diffmem.errors import DiffmemError


def check_output_dir(out: Path, owned: Sequence[str], overwrite: bool) -> None:
    """Refuse ``out`` unless it is new, empty, or (with ``overwrite``) an earlier run's: one holding
    some of the entries ``owned`` that this command writes, and nothing else."""
    if out.exists() and not out.is_dir():
        raise DiffmemError(f"{out} is a file; --out takes a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not entries:
        return
    foreign = [name for name in entries if name not in owned]
    if foreign:
        raise DiffmemError(
            f"{out} holds files this command did not write ({', '.join(foreign[:3])}); choose another --out"
        )
    if not overwrite:
        raise DiffmemError(
            f"{out} holds an earlier run; choose another --out or pass --overwrite to replace it"
        )


def clear_output_dir(out: Path, owned: Sequence[str]) -> None:
    """Remove an earlier run's entries from ``out`` (checked with :func:`check_output_dir`) and create it."""
    for name in owned:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite``; refuse a directory always."""
    if path.is_dir():
        raise DiffmemError(f"{path} is a directory; --out takes a file path")
    if path.exists() and not overwrite:
        raise DiffmemError(f"{path} exists; choose another --out or pass --overwrite to replace it")

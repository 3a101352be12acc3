"""A scan's output directory: rows committed in atomic Parquet part files, so a scan killed at any
moment and resumed ends with every prompt exactly once; the merged table and summary at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from diffmem.errors import DiffmemError
from diffmem.io.atomic import write_atomic, write_parquet_atomic

SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("prompt", pa.string()),
        ("status", pa.string()),  # ok, nonfinite, empty, not_utf8, missing
        ("score", pa.float64()),  # null when not scored; NaN when the model output was not finite
        ("flagged", pa.bool_()),  # null without a calibration or without a finite score
        ("tokens", pa.int32()),  # start and end tokens included; null for models without a tokenizer
        ("truncated", pa.bool_()),  # the model saw only the first `limit` tokens
        ("seeds", pa.list_(pa.int64())),
        ("num_inference_steps", pa.int32()),
        ("scored_steps", pa.int32()),
        ("generations", pa.int32()),
        ("detector", pa.string()),
        ("model_hash", pa.string()),
    ]
)
SETTINGS_FILE = "scan_settings.json"
TABLE_FILE = "scan.parquet"
SUMMARY_FILE = "summary.json"
PARTS_DIR = "parts"


class ScanStore:
    """Opens (or creates) a scan directory for ``settings``; ``mode`` is "new", "resume" or "overwrite".
    Processes scanning into one directory at once each commit under their own ``rank``."""

    def __init__(
        self, out_dir: Path, settings: dict[str, Any], mode: str = "new", rank: int | None = None
    ) -> None:
        if mode not in ("new", "resume", "overwrite"):
            raise DiffmemError(f"unknown scan mode {mode!r}")
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir / PARTS_DIR
        self.part_prefix = "part-" if rank is None else f"part-rank{rank}-"
        self.settings = json.loads(json.dumps(settings, default=str))
        if self.out_dir.exists() and any(self.out_dir.iterdir()):
            self._open_existing(mode)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.parts_dir.glob("*.tmp"):  # a part being written when the scan was killed
            leftover.unlink()
        write_atomic(self.out_dir / SETTINGS_FILE, json.dumps(self.settings, indent=2).encode())

    def _open_existing(self, mode: str) -> None:
        settings_path = self.out_dir / SETTINGS_FILE
        if not settings_path.is_file():
            raise DiffmemError(
                f"{self.out_dir} exists and is not a diffmem scan directory; choose another --out"
            )
        if mode == "new":
            raise DiffmemError(
                f"{self.out_dir} holds a scan; pass --resume to continue it or --overwrite to replace it"
            )
        if mode == "overwrite":
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            for name in (TABLE_FILE, SUMMARY_FILE, SETTINGS_FILE):
                (self.out_dir / name).unlink(missing_ok=True)
            return
        saved, current = _flat(json.loads(settings_path.read_text())), _flat(self.settings)
        differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differ:
            raise DiffmemError(
                f"cannot resume {self.out_dir}: {', '.join(differ)} differ from the interrupted scan's; "
                "pass --overwrite to start again"
            )

    def parts(self) -> list[Path]:
        """The committed part files, in commit order."""
        return sorted(self.parts_dir.glob("part-*.parquet"))

    def done_ids(self) -> set[int]:
        """Ids of the prompts whose rows are committed."""
        return {
            i
            for part in self.parts()
            for i in pq.read_table(part, columns=["prompt_id"])["prompt_id"].to_pylist()
        }

    def commit(self, rows: pa.Table) -> None:
        """Write rows as the next part file: all of them become visible at once, or none."""
        if rows.num_rows == 0:
            return
        prefix = self.part_prefix
        own = sorted(self.parts_dir.glob(f"{prefix}[0-9]*.parquet"))
        number = int(own[-1].stem.removeprefix(prefix)) + 1 if own else 0
        path = self.parts_dir / f"{prefix}{number:06d}.parquet"
        write_parquet_atomic(rows.cast(SCHEMA), path)

    def merge(self, order: list[int]) -> pa.Table:
        """Every committed row, one per prompt id in ``order``, written to the scan table."""
        parts = self.parts()
        table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else SCHEMA.empty_table()
        ids = table["prompt_id"].to_pylist()
        if len(set(ids)) != len(ids) or set(ids) != set(order):
            raise DiffmemError(
                f"{self.parts_dir} does not hold exactly one row per prompt; scan again with --overwrite"
            )
        position = {prompt_id: i for i, prompt_id in enumerate(ids)}
        table = table.take(pa.array([position[i] for i in order], pa.int64()))
        write_parquet_atomic(table, self.out_dir / TABLE_FILE)
        return table


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat

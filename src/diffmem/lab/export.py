"""A lab dataset written as an image folder in the Hugging Face ``imagefolder`` convention, so that every
lab experiment can also run through the path that people's own data takes.

The folder holds the training scenes' images (byte-for-byte copies), ``metadata.parquet`` with one row
per training row (``file_name``, ``text``, and the lab's ``row_id``, ``scene_id``, ``group`` and
``trigger_words``), and ``lab_config.json``, the settings the lab dataset was built with.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from diffmem.errors import DiffmemError
from diffmem.lab.dataset import load_lab_dataset

METADATA = "metadata.parquet"
LAB_CONFIG = "lab_config.json"  # not config.json: the export reads as an image folder, not a lab dataset


def export_lab_dataset(data: Path, out: Path) -> Path:
    """Write the training rows of the lab dataset at ``data`` as an image folder at ``out`` (new or
    empty), which appears complete or not at all; returns ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DiffmemError(f"{out} exists and is not an empty folder; choose a new path or delete it")
    lab = load_lab_dataset(data)
    train = lab.train
    metadata = pa.table(
        {
            "file_name": train.column("image"),
            "text": train.column("caption"),
            "row_id": train.column("row_id"),
            "scene_id": train.column("scene_id"),
            "group": train.column("group"),
            "trigger_words": train.column("trigger_words"),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staging = scratch / out.name
        staging.mkdir()
        for name in sorted(set(train.column("image").to_pylist())):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            if not (lab.directory / name).is_file():
                raise DiffmemError(f"{lab.directory} lacks {name}, an image of its training rows; rebuild it")
            shutil.copyfile(lab.directory / name, staging / name)
        pq.write_table(metadata, staging / METADATA)
        record = {"exported_from": str(Path(data).resolve()), "config": asdict(lab.config)}
        (staging / LAB_CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        staging.replace(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out

"""Which detection threshold a command flags with: a calibration file the user gives must apply to the
model and settings (else the command stops); the shipped lab model's own applies or is set aside aloud."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from diffmem.detect.calibration import Calibration
from diffmem.errors import DiffmemError
from diffmem.models import shipped_directory


def detection_threshold(
    model: str, calibration: Path | None, detector: str, settings: dict[str, Any], identity: str
) -> float | None:
    """The threshold of ``calibration``, or of the shipped model's calibration when none is given;
    None when there is none, or the shipped one was made for other settings (said on stderr)."""
    if calibration is not None:
        given = Calibration.load(calibration)
        try:
            given.check(detector, settings, identity)
        except DiffmemError as mismatch:
            raise DiffmemError(f"{calibration} does not apply: {mismatch}") from None
        return given.threshold
    shipped = shipped_directory(model)
    if shipped is None or not (shipped / "calibration.json").is_file():
        return None
    own = Calibration.load(shipped / "calibration.json")
    try:
        own.check(detector, settings, identity)
    except DiffmemError as mismatch:
        typer.echo(f"not flagging: the lab model's calibration does not apply ({mismatch})", err=True)
        return None
    return own.threshold

"""Which detection threshold a workflow flags with: a calibration file the user gives must apply to the
model and settings (else the workflow stops); a shipped lab model's own applies or is set aside aloud."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffmem.detect.calibration import Calibration
from diffmem.errors import DiffmemError
from diffmem.models import ModelSource

log = logging.getLogger(__name__)


def detection_threshold(
    source: ModelSource, calibration: Path | None, detector: str, settings: dict[str, Any]
) -> float | None:
    """The threshold of ``calibration``, or of the shipped model's calibration when none is given;
    None when there is none, or the shipped one was made for other settings (logged as a warning)."""
    if calibration is not None:
        given = Calibration.load(calibration)
        try:
            given.check(detector, settings, source.identity)
        except DiffmemError as mismatch:
            raise DiffmemError(f"{calibration} does not apply: {mismatch}") from None
        return given.threshold
    if source.calibration is None:
        return None
    own = Calibration.load(source.calibration)
    try:
        own.check(detector, settings, source.identity)
    except DiffmemError as mismatch:
        log.warning("not flagging: the lab model's calibration does not apply (%s)", mismatch)
        return None
    return own.threshold

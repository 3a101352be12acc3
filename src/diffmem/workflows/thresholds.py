"""Which detection threshold a workflow flags with: a calibration file the user gives must apply to the
model and settings (else the workflow stops); a shipped lab model's own applies or is set aside aloud;
any other model's comes from its self-calibration profile, measured the first time it is needed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffmem.detect.calibration import Calibration, differing_settings
from diffmem.detect.noise_norm import NoiseNormConfig
from diffmem.detect.registry import config_settings
from diffmem.errors import DiffmemError
from diffmem.models.source import ModelSource
from diffmem.workflows.calibrate import model_profile
from diffmem.workflows.runtime import Runtime

log = logging.getLogger(__name__)


def detection_threshold(
    source: ModelSource,
    calibration: Path | None,
    detector: str,
    settings: dict[str, Any],
    runtime: Runtime | None = None,
    index: Path | None = None,
    encoder: Path | None = None,
) -> float | None:
    """The threshold of ``calibration``, else of the shipped model's calibration, else (with a ``runtime``
    to measure it in) of the model's profile: against the training-set ``index`` when given (its
    single-copy captions are the model's own kind of text), else on the bundled neutral prompts. None when
    none applies to these settings (logged as a warning)."""
    if encoder is not None and index is None:
        raise DiffmemError("--encoder goes with an embedding index: give --index too")
    if calibration is not None:
        given = Calibration.load(calibration)
        try:
            given.check(detector, settings, source.identity)
        except DiffmemError as mismatch:
            raise DiffmemError(f"{calibration} does not apply: {mismatch}") from None
        return given.threshold
    if source.calibration is not None:
        return _applying(
            Calibration.load(source.calibration), "the lab model's calibration", detector, settings, source
        )
    profiled = config_settings(NoiseNormConfig(base_seed=runtime.seed)) if runtime is not None else None
    if detector != "noise_norm" or profiled is None or differing_settings(settings, profiled):
        return None  # a profile measures the default settings only
    try:
        profile = model_profile(source, runtime, None, *((index, encoder) if index else ()))
    except DiffmemError as problem:  # e.g. a model not conditioned on text
        log.warning("not flagging: no self-calibration (%s)", problem)
        return None
    return _applying(profile.calibration(), "the model's self-calibration", detector, settings, source)


def _applying(
    calibration: Calibration, what: str, detector: str, settings: dict[str, Any], source: ModelSource
) -> float | None:
    try:
        calibration.check(detector, settings, source.identity)
    except DiffmemError as mismatch:
        log.warning("not flagging: %s does not apply (%s); diffmem calibrate makes one", what, mismatch)
        return None
    return calibration.threshold

"""What several workflows open the same way: a training-set reference checked against the model, the
guard of a calibrated model, and the items a model is conditioned on."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from diffmem.calibration.profile import ModelProfile
from diffmem.detect.calibration import Calibration
from diffmem.detect.noise_norm import NoiseNormConfig
from diffmem.errors import DiffmemError
from diffmem.index.model_match import dataset_mismatch
from diffmem.io.prompts import read_prompts
from diffmem.mitigate import Guard, ReferenceSet
from diffmem.mitigate.training_similarity import open_reference
from diffmem.models.source import ModelSource

log = logging.getLogger(__name__)


def training_reference(
    index: Path, encoder: Path | None, device: torch.device, source: ModelSource
) -> ReferenceSet:
    """The training set of an index (:func:`~diffmem.mitigate.training_similarity.open_reference`); logs
    a warning when the index and the model name different lab datasets."""
    reference = open_reference(index, encoder, device)
    mismatch = dataset_mismatch(reference.index.manifest, source.spec.name)
    if mismatch is not None:
        log.warning("warning: %s: %s", index, mismatch)
    return reference


def calibrated_guard(
    source: ModelSource, calibration: Path | None, profile: ModelProfile | None = None
) -> Guard:
    """The guard from a noise-norm calibration made for this model: the one given, a shipped lab model's,
    or the model's self-calibration profile."""
    calibration = calibration or source.calibration
    if calibration is None and profile is None:
        raise DiffmemError(
            "--guard needs a noise-norm calibration of this model: give --calibration (diffmem calibrate)"
        )
    calibrated = profile.calibration() if calibration is None else Calibration.load(calibration)
    calibrated.check("noise_norm", calibrated.settings, source.identity)
    return Guard(calibrated.threshold, NoiseNormConfig(**calibrated.settings))


def conditioning_items(conditioning: str, prompts: list[str], prompts_file: Path | None, column: str) -> list:
    """What to condition each prompt row on, by the model's kind of conditioning."""
    if prompts_file is not None:
        prompts = [*prompts, *read_prompts(prompts_file, column)]
    if conditioning == "none":
        if prompts:
            raise DiffmemError("this model is unconditional: give no prompts, only --n-generations")
        return [None]
    if not prompts:
        raise DiffmemError("give prompts as arguments or with --prompts-file")
    if conditioning == "class":
        try:
            return [int(p) for p in prompts]
        except ValueError as error:
            raise DiffmemError(
                f"this model is class-conditional: prompts must be class numbers ({error})"
            ) from error
    return prompts

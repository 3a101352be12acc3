"""Detection thresholds: chosen on prompts known not to be memorized, at a target false-positive rate,
and saved with the detector settings and the hash of the model they hold for (SPEC §1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffmem.core.denoiser import Denoiser
from diffmem.detect.registry import config_settings, detector
from diffmem.errors import DiffmemError
from diffmem.io.atomic import read_json, write_json_atomic
from diffmem.metrics.roc import threshold_at_fpr

IGNORED_SETTINGS = ("batch_size",)  # settings that do not change a score


def differing_settings(
    settings: dict[str, Any], other: dict[str, Any], also_ignored: tuple = ()
) -> list[str]:
    """The detector settings, sorted, whose values differ between ``settings`` and ``other`` (a missing one
    is None), leaving out those that do not change a score and ``also_ignored``."""
    ignored = {*IGNORED_SETTINGS, *also_ignored}
    return sorted(k for k in {*settings, *other} - ignored if settings.get(k) != other.get(k))


@dataclass(frozen=True)
class Calibration:
    """A threshold on one detector's scores: prompts scoring above it are flagged as memorized."""

    detector: str
    settings: dict[str, Any]
    model_hash: str
    target_fpr: float
    threshold: float
    num_prompts: int  # non-memorized prompts the threshold was chosen on
    observed_fpr: float  # share of those prompts above the threshold

    def check(self, detector_name: str, settings: dict[str, Any], model_hash: str) -> None:
        """Raise unless this calibration was made for the same detector, settings and model."""
        if detector_name != self.detector:
            raise DiffmemError(f"the calibration is for detector {self.detector!r}, not {detector_name!r}")
        if model_hash != self.model_hash:
            raise DiffmemError(
                f"the calibration was made for model {self.model_hash[:12]}, not {model_hash[:12]}; calibrate again"
            )
        differ = differing_settings(settings, self.settings)
        if differ:
            details = ", ".join(
                f"{k}={settings.get(k)!r} (calibrated {self.settings.get(k)!r})" for k in differ
            )
            raise DiffmemError(f"detector settings differ from the calibration's: {details}")

    def save(self, path: Path) -> None:
        """Write the calibration as JSON (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """Read a calibration written by :meth:`save`; anything else is an error that says what is wrong."""
        record = read_json(path, "diffmem calibration file")
        problem = _record_problem(record)
        if problem is not None:
            raise DiffmemError(
                f"{path} is not a diffmem calibration file ({problem}); make one with diffmem calibrate"
            )
        return cls(**record)


FIELD_TYPES = {
    "detector": str,
    "settings": dict,
    "model_hash": str,
    "target_fpr": float,
    "threshold": float,
    "num_prompts": int,
    "observed_fpr": float,
}


def _record_problem(record: Any) -> str | None:
    """What makes ``record`` not a calibration, or None."""
    if not isinstance(record, dict):
        return "it does not hold a JSON object"
    missing = [name for name in FIELD_TYPES if name not in record]
    if missing:
        return f"missing {', '.join(missing)}"
    unknown = sorted(set(record) - set(FIELD_TYPES))
    if unknown:
        return f"unknown fields {', '.join(unknown)}"
    for name, kind in FIELD_TYPES.items():
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, int | float if kind is float else kind):
            return f"{name} must be {'a number' if kind is float else kind.__name__}; got {value!r}"
    if not math.isfinite(record["threshold"]):
        return f"threshold must be a finite number; got {record['threshold']!r}"
    return None


def calibrate(
    denoiser: Denoiser,
    prompts: Sequence[str],
    detector_name: str,
    config: Any,
    model_hash: str,
    target_fpr: float = 0.01,
    progress: bool = False,
) -> Calibration:
    """Score non-memorized ``prompts`` and place the threshold at ``target_fpr`` of them."""
    if not 0 < target_fpr < 1:
        raise DiffmemError(f"target_fpr must be between 0 and 1; got {target_fpr}")
    _, detect = detector(detector_name)
    scores = detect(denoiser, prompts, config, progress=progress).scores
    finite = [float(s) for s in scores if math.isfinite(float(s))]
    if not finite:
        raise DiffmemError("no prompt of the calibration set got a finite score")
    threshold = threshold_at_fpr(finite, target_fpr)
    return Calibration(
        detector=detector_name,
        settings=config_settings(config),
        model_hash=model_hash,
        target_fpr=target_fpr,
        threshold=float(threshold),
        num_prompts=len(finite),
        observed_fpr=sum(s > threshold for s in finite) / len(finite),
    )

"""A model's profile: the first-step noise norms of prompts it has no reason to have memorized, and the
defaults they give every method, so that no knob is tuned by hand for a model without labels.

- Detection flags a prompt above the ``target_fpr`` quantile of the ordinary prompts' scores (Wen et al.
  choose the threshold on non-memorized prompts at a target false-positive rate, SPEC §1).
- Prompt optimisation stops once a prompt's score is as low as the ``prompt_quantile`` of ordinary
  prompts: the paper's fixed target (l_target = 3 for n = 4 on SD 1.4, SPEC §3) is a point on SD 1.4's
  scale, and a model whose ordinary prompts score below it would stop before anything changed. It starts
  only on a generation scoring above the ``start_quantile`` of ordinary prompts, so ordinary prompts keep
  their embedding as they do under the paper's target on SD 1.4.
- AMG's gate is fitted against the training-set index the profile was made with (:mod:`fitted_gate`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.detect.calibration import Calibration
from diffmem.errors import DiffmemError
from diffmem.io.atomic import read_json, write_json_atomic
from diffmem.metrics.roc import threshold_at_fpr

FORMAT = "diffmem.model_profile"
PROMPT_QUANTILE = 0.1  # prompt optimisation's target: this quantile of ordinary prompts' scores
START_QUANTILE = 0.9  # prompt optimisation acts on a generation above this quantile of them


@dataclass(frozen=True)
class ModelProfile:
    """Ordinary prompts' scores on one model, and where they came from."""

    model_hash: str
    reference: str  # which prompts: "neutral", "index captions" or a prompt file's path
    settings: dict[str, Any]  # the noise-norm settings (NoiseNormConfig) the scores were measured with
    scores: list[float]  # their first-step noise norms, ascending
    target_fpr: float = 0.01
    prompt_quantile: float = PROMPT_QUANTILE
    start_quantile: float = START_QUANTILE
    gate: str | None = None  # AMG gate fitted against the index below (a FittedGate file)
    index_fingerprint: str | None = None
    format: str = field(default=FORMAT)

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise DiffmemError(f"not a model profile (format {self.format!r})")
        if not self.scores or not all(isinstance(s, int | float) and math.isfinite(s) for s in self.scores):
            raise DiffmemError("a model profile needs one finite score per ordinary prompt")
        for name in ("target_fpr", "prompt_quantile", "start_quantile"):
            if not 0 < getattr(self, name) < 1:
                raise DiffmemError(
                    f"a model profile's {name} must be between 0 and 1; got {getattr(self, name)}"
                )

    @property
    def detection_threshold(self) -> float:
        """The score above which a prompt is flagged: ``target_fpr`` of ordinary prompts lie above it."""
        return float(threshold_at_fpr(self.scores, self.target_fpr))

    @property
    def prompt_target(self) -> float:
        """Prompt optimisation's per-generation target: the ``prompt_quantile`` of ordinary prompts' scores."""
        return float(np.quantile(self.scores, self.prompt_quantile))

    @property
    def prompt_start(self) -> float:
        """The score above which prompt optimisation acts: the ``start_quantile`` of ordinary prompts."""
        return float(np.quantile(self.scores, self.start_quantile))

    def calibration(self) -> Calibration:
        """The detection calibration the profile implies (for whatever takes a calibration file)."""
        threshold = self.detection_threshold
        return Calibration(
            detector="noise_norm",
            settings=dict(self.settings),
            model_hash=self.model_hash,
            target_fpr=self.target_fpr,
            threshold=threshold,
            num_prompts=len(self.scores),
            observed_fpr=sum(s > threshold for s in self.scores) / len(self.scores),
        )

    def save(self, path: Path) -> None:
        """Write the profile as JSON (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> ModelProfile:
        """Read a profile written by :meth:`save`."""
        record = read_json(path, "model profile")
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise DiffmemError(f"{path} is not a model profile (diffmem calibrate writes one)")
        try:
            return cls(**record)
        except TypeError as error:
            raise DiffmemError(f"{path} is not a model profile: {error}") from error

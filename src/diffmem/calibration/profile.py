"""A model's profile: the first-step noise norms of prompts it has no reason to have memorized, and the
defaults they give every method, so that no knob is tuned by hand for a model without labels.

- Detection flags a prompt above the ``target_fpr`` quantile of the ordinary prompts' scores (Wen et al.
  choose the threshold on non-memorized prompts at a target false-positive rate, SPEC §1). The scores are
  single-generation draws, ``REFERENCE_SCORES`` of them at least (each prompt at several seeds when
  prompts are fewer): a 1% quantile from 256 draws sits between their 2nd and 3rd highest and moves with
  the seed (the zoo's trail lab, benchmarks/threshold_stability.py: 0.455-0.506 over three seeds, 1.2-3.0%
  of its held-out prompts flagged; from 1,024 draws 0.480-0.489, 1.2-2.1%).
- Prompt optimisation acts on a generation scoring above the ``START_QUANTILE`` of ordinary prompts and
  stops once its score is a ``PROMPT_DEPTH`` fraction of their ``PROMPT_QUANTILE``: below nearly every
  ordinary prompt. The paper's fixed target (l_target = 3 for n = 4 on SD 1.4, SPEC §3) is a point on
  SD 1.4's scale. Where memorization is strong, an embedding optimised only down to ordinary prompts'
  level still copies (the zoo's digits lab: 65% of generations); a quarter of it cut copies by 80% or
  more on every zoo lab whose memorization the first-step score sees, and with an index, optimising on
  while the gate still confirms a redraw, on every zoo lab (docs/results.md).
  Starting above the 95% quantile, not the 90%, spares the ordinary prompts that score among memorized
  ones (the keyed lab: FID 1.20x and -5.6 points of alignment from 90%, 1.02x and 0 from 95%).
  With a training-set index the gate fitted to it confirms each copy (:mod:`prompt_optimization`), and
  the start is the gate's own quantile of these scores: each test passes a tenth of ordinary draws, and
  the score alone no longer has to spare them (the sparse lab: 16% of held-out draws pass the 95%
  quantile, 5% also pass the gate from the 90%; benchmarks/prompt_optimization_selection.py).
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
from diffmem.mitigate.fitted_gate import FittedGate

FORMAT = "diffmem.model_profile"
PROMPT_QUANTILE = 0.1  # prompt optimisation's target is PROMPT_DEPTH times this quantile of ordinary scores
PROMPT_DEPTH = 0.25
START_QUANTILE = 0.95  # prompt optimisation acts on a generation above this quantile of them
REFERENCE_SCORES = 1024  # the fewest single-generation scores a profile draws
LEGACY_FIELDS = ("prompt_quantile", "start_quantile")  # policy once stored in profiles, now constants


def generations_for(prompts: int, draws: int) -> int:
    """The seeds each of ``prompts`` ordinary prompts is scored at, so that they give ``draws`` scores."""
    return math.ceil(draws / prompts)


@dataclass(frozen=True)
class ModelProfile:
    """Ordinary prompts' scores on one model, and where they came from."""

    model_hash: str
    reference: str  # which prompts: "neutral", "index captions" or a prompt file's path
    settings: dict[str, Any]  # the noise-norm settings (NoiseNormConfig) the scores were measured with
    scores: list[float]  # their first-step noise norms, one generation a score, ascending
    generations_per_prompt: int = 1  # scores drawn from each prompt, at as many seeds
    target_fpr: float = 0.01
    gate: str | None = None  # AMG gate fitted against the index below (a FittedGate file)
    index_fingerprint: str | None = None
    format: str = field(default=FORMAT)

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise DiffmemError(f"not a model profile (format {self.format!r})")
        if not self.scores or not all(isinstance(s, int | float) and math.isfinite(s) for s in self.scores):
            raise DiffmemError("a model profile needs a finite score for every draw")
        if self.generations_per_prompt < 1 or len(self.scores) % self.generations_per_prompt:
            raise DiffmemError("a model profile draws the same whole number of scores from every prompt")
        if not 0 < self.target_fpr < 1:
            raise DiffmemError(f"a model profile's target_fpr must be between 0 and 1; got {self.target_fpr}")

    @property
    def detection_threshold(self) -> float:
        """The score above which a prompt is flagged: ``target_fpr`` of ordinary prompts lie above it."""
        return float(threshold_at_fpr(self.scores, self.target_fpr))

    @property
    def prompt_target(self) -> float:
        """Prompt optimisation's per-generation target: ``PROMPT_DEPTH`` times the ``PROMPT_QUANTILE`` of
        ordinary prompts' scores."""
        return PROMPT_DEPTH * float(np.quantile(self.scores, PROMPT_QUANTILE))

    def prompt_start(self, confirmed_by: FittedGate | None = None) -> float:
        """The score above which prompt optimisation acts: the ``START_QUANTILE`` of ordinary prompts, or
        the quantile of the gate that confirms each copy (``confirmed_by``)."""
        quantile = START_QUANTILE if confirmed_by is None else confirmed_by.quantile
        return float(np.quantile(self.scores, quantile))

    def calibration(self) -> Calibration:
        """The detection calibration the profile implies (for whatever takes a calibration file)."""
        threshold = self.detection_threshold
        return Calibration(
            detector="noise_norm",
            settings=dict(self.settings),
            model_hash=self.model_hash,
            target_fpr=self.target_fpr,
            threshold=threshold,
            num_prompts=len(self.scores) // self.generations_per_prompt,
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
            return cls(**{k: v for k, v in record.items() if k not in LEGACY_FIELDS})
        except TypeError as error:
            raise DiffmemError(f"{path} is not a model profile: {error}") from error

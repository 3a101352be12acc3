"""The magnitude filter (Wen et al., ICLR 2024, Sec. 6; SPEC §4): in a fine-tuning step, samples whose
text-conditional noise prediction is far from the unconditional one at the sampled t are the ones being
memorized; their loss is masked out of the step.

Samples are masked, never removed from the batch, so every process of a multi-GPU run keeps the same
batch shapes; a step whose samples are all masked contributes a zero loss (with its graph) instead of
being skipped by some processes only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch

from diffmem.errors import DiffmemError

DEFAULT_THRESHOLD = 2.0  # Wen et al.'s threshold for SD 1.4 fine-tuning


@dataclass(frozen=True)
class MagnitudeFilterConfig:
    """Where the filter cuts, and when to warn that it drops everything.

    A magnitude scales with the latent size, so SD 1.4's threshold does not carry over to other models;
    ``quantile`` (ours, not the paper's) sets the threshold from the starting model instead: that quantile
    of the magnitudes of ``calibration_batches`` training batches, measured before the first update.
    """

    threshold: float | None = None  # drop samples with ||model_pred - eps_uncond|| >= threshold (default 2.0)
    quantile: float | None = None  # or: the threshold is this quantile of the starting model's magnitudes
    calibration_batches: int = 16
    warn_after_steps: int = 100  # consecutive steps with every sample dropped before a warning

    def __post_init__(self) -> None:
        if self.threshold is not None and self.quantile is not None:
            raise DiffmemError("give the magnitude filter a threshold or a quantile, not both")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold > 0):
            raise DiffmemError(
                f"the magnitude filter's threshold must be a positive number; got {self.threshold}"
            )
        if self.quantile is not None and not 0 < self.quantile < 1:
            raise DiffmemError(f"the magnitude filter's quantile must lie in (0, 1); got {self.quantile}")
        if self.calibration_batches < 1:
            raise DiffmemError(f"calibration_batches must be at least 1; got {self.calibration_batches}")
        if self.warn_after_steps < 1:
            raise DiffmemError(f"warn_after_steps must be at least 1; got {self.warn_after_steps}")

    def calibrated(self, magnitudes: torch.Tensor) -> MagnitudeFilterConfig:
        """This configuration with its threshold set to ``quantile`` of ``magnitudes`` (the starting
        model's, over the calibration batches)."""
        if self.quantile is None:
            raise DiffmemError(
                "this magnitude filter has a fixed threshold; there is no quantile to calibrate"
            )
        return replace(
            self, threshold=float(torch.quantile(magnitudes.float(), self.quantile)), quantile=None
        )


@dataclass(frozen=True)
class FilteredLoss:
    """One step's losses after the filter."""

    loss: torch.Tensor  # [] mean of the kept samples' losses; 0 (with its graph) when none is kept
    kept: torch.Tensor  # [B] bool
    magnitude: torch.Tensor  # [B] ||model_pred - eps_uncond||_2 per sample

    @property
    def drop_rate(self) -> float:
        """Share of the batch the filter dropped."""
        return 1.0 - float(self.kept.float().mean())


class MagnitudeFilter:
    """Masks high-magnitude samples out of each step's loss and watches how many it drops."""

    def __init__(self, config: MagnitudeFilterConfig = MagnitudeFilterConfig()) -> None:
        if config.quantile is not None:
            raise DiffmemError(
                "calibrate the magnitude filter's quantile first (MagnitudeFilterConfig.calibrated)"
            )
        self.config = config
        self.threshold = DEFAULT_THRESHOLD if config.threshold is None else config.threshold
        self.all_dropped_steps = 0  # consecutive steps so far with every sample dropped

    def __call__(
        self, losses: torch.Tensor, model_pred: torch.Tensor, eps_uncond: torch.Tensor
    ) -> FilteredLoss:
        """Filter per-sample ``losses`` [B] by the magnitude of ``model_pred - eps_uncond`` [B, C, H, W]."""
        if losses.shape != model_pred.shape[:1]:
            raise DiffmemError(
                f"give one loss per sample: {tuple(losses.shape)} for a batch of {model_pred.shape[0]}"
            )
        magnitude = prediction_magnitude(model_pred, eps_uncond)
        kept = magnitude < self.threshold
        count = kept.sum()
        loss = (losses * kept.to(losses.dtype)).sum() / count.clamp_min(1).to(losses.dtype)
        self._watch(bool(count == 0))
        return FilteredLoss(loss=loss, kept=kept, magnitude=magnitude)

    def _watch(self, all_dropped: bool) -> None:
        self.all_dropped_steps = self.all_dropped_steps + 1 if all_dropped else 0
        if self.all_dropped_steps == self.config.warn_after_steps:
            warnings.warn(
                f"the magnitude filter dropped every sample for {self.all_dropped_steps} steps in a row: "
                f"the model is not learning; raise the threshold (now {self.threshold:g})",
                RuntimeWarning,
                stacklevel=3,
            )


def prediction_magnitude(model_pred: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """[B] ``||model_pred - eps_uncond||_2`` per sample, without gradients."""
    # ||eps_theta(x_t, t, e_prompt) - eps_theta(x_t, t, e_null)||_2 at the sampled t (Wen et al., Sec. 6)
    return (model_pred.detach() - eps_uncond.detach()).flatten(1).float().norm(dim=1)

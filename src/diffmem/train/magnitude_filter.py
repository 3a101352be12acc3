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
from dataclasses import dataclass

import torch

from diffmem.errors import DiffmemError


@dataclass(frozen=True)
class MagnitudeFilterConfig:
    """Wen et al.'s threshold for SD 1.4 fine-tuning, and when to warn that it drops everything."""

    threshold: float = 2.0  # drop samples with ||model_pred - eps_uncond|| >= threshold
    warn_after_steps: int = 100  # consecutive steps with every sample dropped before a warning

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise DiffmemError(
                f"the magnitude filter's threshold must be a positive number; got {self.threshold}"
            )
        if self.warn_after_steps < 1:
            raise DiffmemError(f"warn_after_steps must be at least 1; got {self.warn_after_steps}")


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
        self.config = config
        self.all_dropped_steps = 0  # consecutive steps so far with every sample dropped

    def __call__(
        self, losses: torch.Tensor, model_pred: torch.Tensor, eps_uncond: torch.Tensor
    ) -> FilteredLoss:
        """Filter per-sample ``losses`` [B] by the magnitude of ``model_pred - eps_uncond`` [B, C, H, W]."""
        if losses.shape != model_pred.shape[:1]:
            raise DiffmemError(
                f"give one loss per sample: {tuple(losses.shape)} for a batch of {model_pred.shape[0]}"
            )
        # ||eps_theta(x_t, t, e_prompt) - eps_theta(x_t, t, e_null)||_2 at the sampled t (Wen et al., Sec. 6)
        magnitude = (model_pred.detach() - eps_uncond.detach()).flatten(1).float().norm(dim=1)
        kept = magnitude < self.config.threshold
        count = kept.sum()
        loss = (losses * kept.to(losses.dtype)).sum() / count.clamp_min(1).to(losses.dtype)
        self._watch(bool(count == 0))
        return FilteredLoss(loss=loss, kept=kept, magnitude=magnitude)

    def _watch(self, all_dropped: bool) -> None:
        self.all_dropped_steps = self.all_dropped_steps + 1 if all_dropped else 0
        if self.all_dropped_steps == self.config.warn_after_steps:
            warnings.warn(
                f"the magnitude filter dropped every sample for {self.all_dropped_steps} steps in a row: "
                f"the model is not learning; raise the threshold (now {self.config.threshold})",
                RuntimeWarning,
                stacklevel=3,
            )

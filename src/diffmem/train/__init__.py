"""Training-time mitigation of memorization: a fine-tuning loop whose per-sample losses pass through
policies (ambient high-noise training, the magnitude filter, caption randomisation, deduplication)."""

from diffmem.train.ambient_loss import ambient_loss_ve, ambient_loss_vp, noisy_copies
from diffmem.train.caption_randomisation import CaptionRandomisationConfig, randomise_captions
from diffmem.train.deduplication import DeduplicationConfig, deduplicate
from diffmem.train.fine_tune import POLICIES, AmbientConfig, FineTuneConfig, FineTuneStatus, fine_tune
from diffmem.train.magnitude_filter import MagnitudeFilter, MagnitudeFilterConfig

__all__ = [
    "POLICIES",
    "AmbientConfig",
    "CaptionRandomisationConfig",
    "DeduplicationConfig",
    "FineTuneConfig",
    "FineTuneStatus",
    "MagnitudeFilter",
    "MagnitudeFilterConfig",
    "ambient_loss_ve",
    "ambient_loss_vp",
    "deduplicate",
    "fine_tune",
    "noisy_copies",
    "randomise_captions",
]

"""Memorization metrics: nL2 (pixel level), copy-detection similarity (object level), and their summaries."""

from diffmem.metrics.copy_detection import (
    COPY_THRESHOLD,
    CopyDetectionConfig,
    CopyDetectionEncoder,
    SSCDTorchScript,
    augment,
    copy_detection_accuracy,
    embed,
    info_nce,
    koleo,
    load_encoder,
    load_sscd_torchscript,
    max_similarity,
    save_encoder,
    train_copy_detector,
)
from diffmem.metrics.memorization import MemorizationSummary, per_prompt, summarize
from diffmem.metrics.nl2 import NL2_THRESHOLD, NL2Result, nl2, pairwise_l2
from diffmem.metrics.quality import FeatureNet, fid, kid

__all__ = [
    "COPY_THRESHOLD",
    "NL2_THRESHOLD",
    "CopyDetectionConfig",
    "CopyDetectionEncoder",
    "FeatureNet",
    "MemorizationSummary",
    "NL2Result",
    "SSCDTorchScript",
    "augment",
    "copy_detection_accuracy",
    "embed",
    "fid",
    "info_nce",
    "kid",
    "koleo",
    "load_encoder",
    "load_sscd_torchscript",
    "max_similarity",
    "nl2",
    "pairwise_l2",
    "per_prompt",
    "save_encoder",
    "summarize",
    "train_copy_detector",
]

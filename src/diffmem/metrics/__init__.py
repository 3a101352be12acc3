"""Memorization metrics: nL2 (pixel level), copy-detection similarity (object level), their summaries,
the ROC of detectors, and quality (FID/KID, loaded on first use: torchmetrics is slow to import)."""

from importlib import import_module

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
from diffmem.metrics.roc import (
    Roc,
    detection_metrics,
    flagged_share_interval,
    roc,
    threshold_at_fpr,
    tpr_at_fpr,
    tpr_key,
)

_LAZY = {
    "FeatureNet": "diffmem.metrics.quality",
    "fid": "diffmem.metrics.quality",
    "kid": "diffmem.metrics.quality",
}

__all__ = [
    "COPY_THRESHOLD",
    "NL2_THRESHOLD",
    "CopyDetectionConfig",
    "CopyDetectionEncoder",
    "FeatureNet",
    "MemorizationSummary",
    "NL2Result",
    "Roc",
    "SSCDTorchScript",
    "augment",
    "copy_detection_accuracy",
    "detection_metrics",
    "embed",
    "fid",
    "flagged_share_interval",
    "info_nce",
    "kid",
    "koleo",
    "load_encoder",
    "load_sscd_torchscript",
    "max_similarity",
    "nl2",
    "pairwise_l2",
    "per_prompt",
    "roc",
    "save_encoder",
    "summarize",
    "threshold_at_fpr",
    "tpr_at_fpr",
    "tpr_key",
    "train_copy_detector",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'diffmem.metrics' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)

"""Every detector by name, with its config class: what ``scan``, ``calibrate`` and ``eval`` choose from."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from diffmem.core.method_spec import lookup, method_config
from diffmem.detect.attention_entropy import AttentionEntropyConfig, attention_entropy
from diffmem.detect.detector import Detect
from diffmem.detect.generation_agreement import GenerationAgreementConfig, generation_agreement
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.detect.one_step import OneStepConfig, one_step
from diffmem.detect.sharpness import SharpnessConfig, sharpness

DETECTORS: dict[str, tuple[type, Detect]] = {
    "noise_norm": (NoiseNormConfig, noise_norm),  # Wen et al. (ICLR 2024)
    "sharpness": (SharpnessConfig, sharpness),  # Jeon et al. (ICML 2025)
    "attention_entropy": (AttentionEntropyConfig, attention_entropy),  # Ren et al. (ECCV 2024)
    "generation_agreement": (GenerationAgreementConfig, generation_agreement),  # Carlini et al. (2023)
    "one_step": (OneStepConfig, one_step),  # Webster (2023)
}


def detector(name: str) -> tuple[type, Detect]:
    """The config class and function of a detector."""
    return lookup("detector", name, DETECTORS)


def detector_config(name: str, **settings: Any) -> Any:
    """A detector's config with the given settings over its defaults; unknown settings are an error."""
    return method_config("detector", name, DETECTORS, settings)


def config_settings(config: Any) -> dict[str, Any]:
    """A detector config as a plain dict (what calibration files and scan settings record)."""
    return asdict(config)

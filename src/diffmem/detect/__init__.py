"""Detectors of memorized prompts: prompts in, one score per prompt out."""

from diffmem.detect.detector import DetectionResult
from diffmem.detect.noise_norm import NoiseNormConfig, NoiseNormTrace, noise_norm

__all__ = ["DetectionResult", "NoiseNormConfig", "NoiseNormTrace", "noise_norm"]

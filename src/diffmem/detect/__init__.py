"""Detectors of memorized prompts: prompts in, one score per prompt out."""

from diffmem.detect.noise_norm import NoiseNormConfig, NoiseNormResult, NoiseNormTrace, noise_norm

__all__ = ["NoiseNormConfig", "NoiseNormResult", "NoiseNormTrace", "noise_norm"]

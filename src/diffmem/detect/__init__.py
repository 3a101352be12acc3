"""Detectors of memorized prompts: prompts in, one score per prompt out (higher: more likely memorized)."""

from diffmem.detect.attention_entropy import AttentionEntropyConfig, attention_entropy
from diffmem.detect.detector import DetectionResult
from diffmem.detect.generation_agreement import GenerationAgreementConfig, generation_agreement
from diffmem.detect.noise_norm import NoiseNormConfig, NoiseNormTrace, noise_norm
from diffmem.detect.one_step import OneStepConfig, one_step
from diffmem.detect.registry import DETECTORS
from diffmem.detect.sharpness import SharpnessConfig, sharpness

__all__ = [
    "DETECTORS",
    "AttentionEntropyConfig",
    "DetectionResult",
    "GenerationAgreementConfig",
    "NoiseNormConfig",
    "NoiseNormTrace",
    "OneStepConfig",
    "SharpnessConfig",
    "attention_entropy",
    "generation_agreement",
    "noise_norm",
    "one_step",
    "sharpness",
]

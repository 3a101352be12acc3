"""Sampling: the guided sampler, per-sample seeding, and batched generation over prompts."""

from diffmem.sampling.generate import Generation, generate
from diffmem.sampling.guided_sampler import GuidanceTerm, Observer, StepState, sample
from diffmem.sampling.seeds import generation_seed

__all__ = [
    "Generation",
    "GuidanceTerm",
    "Observer",
    "StepState",
    "generate",
    "generation_seed",
    "sample",
]

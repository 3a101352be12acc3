"""diffmem: find, explain and remove memorization in diffusion models."""

from diffmem.adapters import load_denoiser, wrap_pipeline
from diffmem.condition import Condition
from diffmem.denoiser import Denoiser, Prediction
from diffmem.errors import DiffmemError
from diffmem.sampling import Generation, GuidanceTerm, Observer, StepState, generate, generation_seed, sample

__all__ = [
    "Condition",
    "Denoiser",
    "DiffmemError",
    "Generation",
    "GuidanceTerm",
    "Observer",
    "Prediction",
    "StepState",
    "generate",
    "generation_seed",
    "load_denoiser",
    "sample",
    "wrap_pipeline",
]

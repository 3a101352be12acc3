"""Every inference-time mitigation by name, with its config class: what ``generate --mitigation`` and
``eval mitigate`` choose from."""

from __future__ import annotations

from typing import Any

from diffmem.core.method_spec import lookup, method_config
from diffmem.errors import DiffmemError
from diffmem.mitigate.anti_memorization_guidance import AntiMemorizationConfig, anti_memorization_guidance
from diffmem.mitigate.bos_attention_scaling import BosAttentionScalingConfig, bos_attention_scaling
from diffmem.mitigate.mitigation import Mitigate, NoMitigationConfig, no_mitigation
from diffmem.mitigate.prompt_optimization import PromptOptimizationConfig, prompt_optimization
from diffmem.mitigate.prompt_perturbation import (
    CaptionWordRepetitionConfig,
    GaussianNoiseInjectionConfig,
    RandomNumberConfig,
    RandomTokenConfig,
    caption_word_repetition,
    gaussian_noise_injection,
    random_number,
    random_token,
)
from diffmem.mitigate.transition_point import (
    DynamicTransitionConfig,
    StaticTransitionConfig,
    dynamic_transition_point,
    static_transition_point,
)

MITIGATIONS: dict[str, tuple[type, Mitigate]] = {
    "none": (NoMitigationConfig, no_mitigation),
    "prompt_optimization": (PromptOptimizationConfig, prompt_optimization),  # Wen et al. (ICLR 2024)
    "amg": (AntiMemorizationConfig, anti_memorization_guidance),  # Chen, Liu, Xu (CVPR 2024)
    "gni": (GaussianNoiseInjectionConfig, gaussian_noise_injection),  # Somepalli et al. (NeurIPS 2023)
    "rt": (RandomTokenConfig, random_token),  # Somepalli et al.
    "cwr": (CaptionWordRepetitionConfig, caption_word_repetition),  # Somepalli et al.
    "rna": (RandomNumberConfig, random_number),  # Somepalli et al.
    "transition_static": (StaticTransitionConfig, static_transition_point),  # Jain et al. (CVPR 2025)
    "transition_dynamic": (DynamicTransitionConfig, dynamic_transition_point),  # Jain et al.
    "bos_scaling": (BosAttentionScalingConfig, bos_attention_scaling),  # Ren et al. (ECCV 2024)
}
TAKES_REFERENCE = ("amg", "prompt_optimization")  # mitigations whose config takes the training set
NEEDS_REFERENCE = ("amg",)  # of them, those that cannot run without it


def mitigation(name: str) -> tuple[type, Mitigate]:
    """The config class and function of a mitigation."""
    return lookup("mitigation", name, MITIGATIONS)


def mitigation_config(name: str, **settings: Any) -> Any:
    """A mitigation's config with the given settings over its defaults; unknown settings are an error."""
    if name in NEEDS_REFERENCE and settings.get("reference") is None:
        raise DiffmemError(f"mitigation {name!r} needs the training set: give an index (--index)")
    return method_config("mitigation", name, MITIGATIONS, settings)

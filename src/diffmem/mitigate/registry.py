"""Every inference-time mitigation by name, with its config class: what ``generate --mitigation`` and
``eval mitigate`` choose from."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from diffmem.errors import DiffmemError
from diffmem.mitigate.anti_memorization_guidance import AntiMemorizationConfig, anti_memorization_guidance
from diffmem.mitigate.mitigation import Mitigate, NoMitigationConfig, no_mitigation
from diffmem.mitigate.prompt_optimization import PromptOptimizationConfig, prompt_optimization

MITIGATIONS: dict[str, tuple[type, Mitigate]] = {
    "none": (NoMitigationConfig, no_mitigation),
    "prompt_optimization": (PromptOptimizationConfig, prompt_optimization),  # Wen et al. (ICLR 2024)
    "amg": (AntiMemorizationConfig, anti_memorization_guidance),  # Chen, Liu, Xu (CVPR 2024)
}
NEEDS_REFERENCE = ("amg",)  # mitigations whose config takes the training set (``reference=``)


def mitigation(name: str) -> tuple[type, Mitigate]:
    """The config class and function of a mitigation."""
    if name not in MITIGATIONS:
        raise DiffmemError(f"unknown mitigation {name!r}; choose one of {', '.join(MITIGATIONS)}")
    return MITIGATIONS[name]


def mitigation_config(name: str, **settings: Any) -> Any:
    """A mitigation's config with the given settings over its defaults; unknown settings are an error."""
    config_class, _ = mitigation(name)
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise DiffmemError(
            f"mitigation {name!r} has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(known)) or 'none'}"
        )
    if name in NEEDS_REFERENCE and settings.get("reference") is None:
        raise DiffmemError(f"mitigation {name!r} needs the training set: give an index (--index)")
    return config_class(**settings)

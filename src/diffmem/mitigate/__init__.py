"""Inference-time mitigation of memorization: one function per method behind one interface."""

from diffmem.mitigate.anti_memorization_guidance import AntiMemorizationConfig, anti_memorization_guidance
from diffmem.mitigate.generate import MitigatedGeneration, mitigated_generate
from diffmem.mitigate.guard import Guard, guard_decision
from diffmem.mitigate.mitigation import Mitigated, SamplingOptions, no_mitigation
from diffmem.mitigate.prompt_optimization import PromptOptimizationConfig, prompt_optimization
from diffmem.mitigate.registry import MITIGATIONS, mitigation, mitigation_config
from diffmem.mitigate.training_similarity import ReferenceSet, training_similarity

__all__ = [
    "MITIGATIONS",
    "AntiMemorizationConfig",
    "Guard",
    "Mitigated",
    "MitigatedGeneration",
    "PromptOptimizationConfig",
    "ReferenceSet",
    "SamplingOptions",
    "anti_memorization_guidance",
    "guard_decision",
    "mitigated_generate",
    "mitigation",
    "mitigation_config",
    "no_mitigation",
    "prompt_optimization",
    "training_similarity",
]

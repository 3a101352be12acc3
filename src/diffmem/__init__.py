"""diffmem: find, explain and remove memorization in diffusion models.

The names below load on first use, so ``import diffmem`` stays light for the command line.
"""

from importlib import import_module

_EXPORTS = {
    "Condition": "diffmem.core.condition",
    "Denoiser": "diffmem.core.denoiser",
    "DiffmemError": "diffmem.errors",
    "Generation": "diffmem.sampling",
    "GuidanceTerm": "diffmem.sampling",
    "Observer": "diffmem.sampling",
    "Prediction": "diffmem.core.denoiser",
    "StepState": "diffmem.sampling",
    "generate": "diffmem.sampling",
    "generation_seed": "diffmem.sampling",
    "load_denoiser": "diffmem.adapters",
    "sample": "diffmem.sampling",
    "wrap_pipeline": "diffmem.adapters",
    "ModelSource": "diffmem.models.source",
    "ModelSpec": "diffmem.models.spec",
    "Lora": "diffmem.models.spec",
    "Runtime": "diffmem.workflows.runtime",
    "ScanConfig": "diffmem.workflows.scan",
    "scan": "diffmem.workflows.scan",
    "CalibrateConfig": "diffmem.workflows.scan",
    "calibrate_detector": "diffmem.workflows.scan",
    "GenerateConfig": "diffmem.workflows.generate",
    "generate_images": "diffmem.workflows.generate",
    "ExplainConfig": "diffmem.workflows.explain",
    "explain_prompt": "diffmem.workflows.explain",
    "IndexConfig": "diffmem.workflows.index",
    "build_index": "diffmem.workflows.index",
    "GateConfig": "diffmem.workflows.index",
    "fit_index_gate": "diffmem.workflows.index",
    "DetectionEvalConfig": "diffmem.workflows.evaluate",
    "evaluate_detection": "diffmem.workflows.evaluate",
    "MitigationEvalConfig": "diffmem.workflows.evaluate",
    "evaluate_mitigation": "diffmem.workflows.evaluate",
    "TrainLabConfig": "diffmem.workflows.lab",
    "train_lab": "diffmem.workflows.lab",
    "LabelLabConfig": "diffmem.workflows.lab",
    "label_lab": "diffmem.workflows.lab",
    "ProfileConfig": "diffmem.workflows.calibrate",
    "calibrate_model": "diffmem.workflows.calibrate",
    "AuditConfig": "diffmem.workflows.audit",
    "audit": "diffmem.workflows.audit",
    "TrainConfig": "diffmem.workflows.train",
    "train_model": "diffmem.workflows.train",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffmem' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)

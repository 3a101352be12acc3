"""Self-calibration: learn a model's scale from prompts it has no reason to have memorized (the Python
side of ``diffmem calibrate``), cached by the model's hash so that every later command reads it, and the
mitigation settings that follow from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmem.calibration.cache import gate_path, profile_path
from diffmem.calibration.profile import REFERENCE_SCORES, ModelProfile, generations_for
from diffmem.calibration.reference_prompts import ordinary_prompts, single_copy_captions
from diffmem.core.denoiser import Denoiser
from diffmem.detect.calibration import differing_settings
from diffmem.detect.noise_norm import NoiseNormConfig, single_generation_scores
from diffmem.detect.registry import config_settings
from diffmem.errors import DiffmemError
from diffmem.explain.token_significance import SignificanceConfig, explainable
from diffmem.index.manifest import read_manifest
from diffmem.index.training_set_index import MANIFEST_FILE
from diffmem.mitigate.fitted_gate import FittedGate, fit_gate, similarity_trajectories
from diffmem.mitigate.mitigation import SamplingOptions
from diffmem.mitigate.training_similarity import ReferenceSet
from diffmem.models.source import ModelSource
from diffmem.models.spec import ModelSpec
from diffmem.workflows.inputs import training_reference
from diffmem.workflows.ordinary_significance import ordinary_significance
from diffmem.workflows.runtime import Runtime

log = logging.getLogger(__name__)

PRESETS = ("calibrated", "paper")  # a mitigation's `preset`: the model's calibrated defaults, or the papers'
# prompt optimisation stops at the calibrated target; the paper's 10 iterations stop short of it on models
# whose embedding must move further (the zoo's infix lab: 62% of memorized generations still copy at 10)
PROMPT_ITERATIONS = 100


@dataclass(frozen=True)
class ProfileConfig:
    """The model, its ordinary prompts, and the training-set index AMG guides against.

    The ordinary prompts are ``prompts`` when given, else the index's single-copy captions (the training
    set's own kind of text), else the bundled neutral prompts.
    """

    model: str | ModelSpec | None = None
    prompts: Path | None = None
    column: str = "prompt"
    index: Path | None = None
    encoder: Path | None = None  # an embedding index's encoder (default: the one it records)
    target_fpr: float = 0.01
    reference_scores: int = REFERENCE_SCORES  # single-generation scores drawn from the ordinary prompts
    gate_prompts: int = 64  # of those, generated in full to fit AMG's gate
    gate_quantile: float = 0.9  # lambda_t: this quantile of their similarity at step t

    def __post_init__(self) -> None:
        for name in ("target_fpr", "gate_quantile"):
            if not 0 < getattr(self, name) < 1:
                raise DiffmemError(f"{name} must be between 0 and 1; got {getattr(self, name)}")
        if min(self.reference_scores, self.gate_prompts) < 1:
            raise DiffmemError("reference_scores and gate_prompts must be at least 1")


def calibrate_model(
    config: ProfileConfig, runtime: Runtime | None = None, denoiser: Denoiser | None = None
) -> ModelProfile:
    """Measure the model's profile and cache it under its hash (``denoiser``: the model, already open)."""
    runtime = runtime or Runtime()
    source = ModelSource.resolve(config.model)
    denoiser = denoiser or source.open(runtime.device, runtime.dtype, runtime.speedups)
    if denoiser.conditioning != "text":
        raise DiffmemError("self-calibration scores prompts: it needs a text-to-image model")
    reference = (
        training_reference(config.index, config.encoder, runtime.device, source) if config.index else None
    )
    index = reference.index if reference is not None else None
    prompts, origin = ordinary_prompts(
        config.prompts, config.column, index, config.reference_scores, runtime.seed
    )
    settings = NoiseNormConfig(base_seed=runtime.seed)
    generations = generations_for(len(prompts), config.reference_scores)
    log.info(
        "calibrating %s on %d ordinary prompts (%s), %d generation(s) each",
        source.name,
        len(prompts),
        origin,
        generations,
    )
    scores = single_generation_scores(denoiser, prompts, settings, generations, progress=True)
    scores = scores.flatten().tolist()
    gate = fingerprint = None
    if reference is not None:
        fingerprint = reference.index.manifest.fingerprint
        gate = _fit_gate(config, source.identity, denoiser, reference, runtime)
    profile = ModelProfile(
        model_hash=source.identity,
        reference=origin,
        settings=config_settings(settings),
        scores=sorted(scores),
        generations_per_prompt=generations,
        target_fpr=config.target_fpr,
        gate=gate,
        index_fingerprint=fingerprint,
    )
    profile.save(profile_path(source.identity, fingerprint))
    if config.prompts is not None and explainable(denoiser):  # explanations weigh words against these
        ordinary = SignificanceConfig(base_seed=runtime.seed, attribute_to="word_replacement")
        ordinary_significance(
            source, ordinary, runtime, denoiser, config.index, config.prompts, config.column
        )
    return profile


def _fit_gate(
    config: ProfileConfig, identity: str, denoiser: Denoiser, reference: ReferenceSet, runtime: Runtime
) -> str:
    """AMG's gate from plain generations of the index's single-copy captions, saved beside the profile."""
    captions = single_copy_captions(reference.index, config.gate_prompts, runtime.seed)
    log.info("fitting AMG's gate on %d single-copy captions", len(captions))
    timesteps, sigmas = similarity_trajectories(
        denoiser, captions, reference, sampling=SamplingOptions(), base_seed=runtime.seed, progress=True
    )
    path = gate_path(identity, reference.index.manifest.fingerprint)
    fit_gate(timesteps, sigmas, reference, config.gate_quantile).save(path)
    return str(path)


def _current(gate: Path) -> bool:
    """Whether a cached gate file is there and fitted by the current rule (own images left out)."""
    return gate.exists() and FittedGate.load(gate).own_images_left_out


def _measured_as_now(profile: ModelProfile) -> bool:
    """Whether a cached profile's scores were measured as the noise norm measures them now (any seed), and
    are as many as a profile draws now."""
    settings = config_settings(NoiseNormConfig())
    return not differing_settings(profile.settings, settings, ("base_seed",)) and (
        len(profile.scores) >= REFERENCE_SCORES
    )


def model_profile(
    source: ModelSource,
    runtime: Runtime | None = None,
    denoiser: Denoiser | None = None,
    index: Path | None = None,
    encoder: Path | None = None,
) -> ModelProfile:
    """The model's cached profile (against ``index`` when given), or one measured now and cached."""
    profile = _cached_profile(source, index)
    if profile is None:
        log.warning(
            "calibrating %s once (cached in %s); diffmem calibrate does it ahead",
            source.name,
            profile_path(source.identity).parent,
        )
        profile = calibrate_model(ProfileConfig(source.spec, index=index, encoder=encoder), runtime, denoiser)
    if profile.reference == "neutral":
        log.warning(
            "%s's scale comes from the bundled neutral prompts; for a model trained on other text give its "
            "training set (--index) so that its own captions set it",
            source.name,
        )
    return profile


def _cached_profile(source: ModelSource, index: Path | None) -> ModelProfile | None:
    """The model's profile against ``index`` (or none) as cached, if it was measured as profiles are now."""
    fingerprint = None if index is None else read_manifest(Path(index) / MANIFEST_FILE).fingerprint
    path = profile_path(source.identity, fingerprint)
    if not path.exists():
        return None
    profile = ModelProfile.load(path)
    current = profile.gate is None or _current(Path(profile.gate))
    return (
        profile if profile.model_hash == source.identity and _measured_as_now(profile) and current else None
    )


def left_to_profile(name: str, settings: dict[str, Any]) -> set[str]:
    """The settings of a mitigation that the model's profile would fill: ``target`` of prompt optimisation
    (and its ``start`` with it), ``gate`` of AMG, unless given or ``preset=paper``."""
    if settings.get("preset") == "paper":
        return set()
    calibrated = {"prompt_optimization": {"target"}, "amg": {"gate"}}.get(name, set())
    return calibrated - set(settings)


def calibrated_settings(
    name: str, settings: dict[str, Any], profile: ModelProfile | None, reference: ReferenceSet | None = None
) -> dict[str, Any]:
    """A mitigation's settings: the ones given, over the model's calibrated defaults (prompt optimisation's
    target, and the start and iteration budget that come with it; the gate fitted for this index, which
    AMG guides by and prompt optimisation confirms a copy with; AMG's excess rule for the dissimilarity
    step); ``preset=paper`` keeps the papers' constants instead."""
    settings = dict(settings)
    preset = settings.pop("preset", "calibrated")
    if preset not in PRESETS:
        raise DiffmemError(f"mitigation {name!r}: preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    if preset == "paper" and name == "prompt_optimization":
        settings.setdefault("centered", False)  # the paper's target is on its uncentred norm
    if preset == "paper" or profile is None:
        return settings
    fitted = reference is not None and profile.index_fingerprint == reference.index.manifest.fingerprint
    gate = profile.gate if fitted else None
    if name == "prompt_optimization" and "target" not in settings:
        settings["target"] = profile.prompt_target
        start = profile.prompt_start(None if gate is None else FittedGate.load(Path(gate)))
        settings.setdefault("start", max(start, profile.prompt_target))
        settings.setdefault("max_iterations", PROMPT_ITERATIONS)
    if name in ("amg", "prompt_optimization") and gate is not None:
        settings.setdefault("gate", gate)
    if name == "amg" and not {"c3", "c3_rule"} & set(settings):
        settings["c3_rule"] = "excess"  # a dissimilarity step in units of the gate, not of SSCD's scale
    return settings

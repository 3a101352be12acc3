"""The release check a model publisher runs (the Python side of ``diffmem audit``): calibrate the model,
score every prompt, explain the flagged ones, generate them plainly and with the calibrated mitigation,
and measure both against the training set; generate a random draw of the unflagged prompts too, to count
the copies the score does not flag."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from diffmem.core.method_spec import parse_method_spec
from diffmem.detect.calibration import Calibration
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.detect.registry import config_settings
from diffmem.errors import DiffmemError
from diffmem.explain.carrying_words import CarryingWords, carrying_words
from diffmem.explain.token_significance import SignificanceConfig, TokenSignificance, token_significance
from diffmem.index.sources import ImageSource, image_source
from diffmem.io.atomic import write_atomic, write_json_atomic, write_parquet_atomic
from diffmem.io.output_dirs import check_output_dir
from diffmem.io.prompts import read_prompts
from diffmem.mitigate.generate import mitigated_generate
from diffmem.mitigate.mitigation import SamplingOptions
from diffmem.mitigate.registry import TAKES_REFERENCE, mitigation_config
from diffmem.mitigate.training_similarity import ReferenceSet, training_similarity
from diffmem.models.names import LAB_MODEL
from diffmem.models.source import ModelSource
from diffmem.models.spec import ModelSpec
from diffmem.report.audit_page import audit_page
from diffmem.workflows.calibrate import calibrated_settings, model_profile
from diffmem.workflows.explain import DEFAULT_ATTRIBUTION
from diffmem.workflows.inputs import training_reference
from diffmem.workflows.ordinary_significance import ordinary_significance
from diffmem.workflows.runtime import Runtime
from diffmem.workflows.thresholds import detection_threshold

OUTPUTS = ("report.html", "audit.parquet", "summary.json")
COPY_THRESHOLDS = {"copy_similarity": 0.5, "nl2": 1.4}  # SPEC §5: SSCD > 0.5, nL2 < 1.4


@dataclass(frozen=True)
class AuditConfig:
    """The model, its prompts, the training-set index, and how much of the flagged set to examine."""

    model: str | ModelSpec = LAB_MODEL
    prompts: Path | None = None  # default: a shipped lab model's own prompts
    column: str | None = None  # default: prompt (caption for a shipped lab model's prompts)
    index: Path | None = None  # default: a shipped lab model's copy index
    encoder: Path | None = None
    calibration: Path | None = None  # default: the model's self-calibration (a shipped model's own)
    mitigation: str | None = None  # default: amg with an index, else prompt_optimization
    max_flagged: int = 32  # explain and generate at most this many flagged prompts, highest scores first
    # generate this many unflagged prompts (a seeded random draw) plainly and count their copies: a prompt
    # that copies without its words pulling (one that falls into a memorized image's basin) scores as
    # ordinary; needs an index
    unflagged_checked: int = 16
    copy_threshold: float | None = None  # default: 0.5 copy similarity, or nL2 1.4
    # the training set an embedding index was built from, to show each image's nearest training image (a
    # pixel index holds its images)
    data: Path | None = None
    attribute_to: str = DEFAULT_ATTRIBUTION
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_flagged < 1 or self.batch_size < 1 or self.unflagged_checked < 0:
            raise DiffmemError("max_flagged and batch_size must be at least 1, unflagged_checked at least 0")
        SignificanceConfig(attribute_to=self.attribute_to)  # a bad attribution fails before any work


@dataclass(frozen=True)
class Audit:
    """Every prompt's score and flag, and for the examined flagged ones their explanation, images and
    similarity to the training set, plain and mitigated."""

    table: pa.Table  # one row per prompt
    explanations: list[TokenSignificance]  # the examined prompts', highest score first
    images: dict[
        str, torch.Tensor
    ]  # "plain"/"mitigated" -> [E, 3, H, W] in [0, 1], "unflagged" -> [U, ...]; none when no prompt
    copies: Copies
    summary: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)
    carrying: list[CarryingWords] = field(default_factory=list)  # the examined prompts' carrying words

    def save(self, out: Path, overwrite: bool = False) -> list[Path]:
        """Write ``report.html`` (self-contained), ``audit.parquet`` and ``summary.json`` into ``out``."""
        check_output_dir(out, OUTPUTS, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(self.table, out / "audit.parquet")
        write_json_atomic(out / "summary.json", {**self.summary, "record": self.record})
        write_atomic(out / "report.html", audit_page(self).encode())
        return [out / name for name in OUTPUTS]


def audit(config: AuditConfig, runtime: Runtime | None = None) -> Audit:
    """Calibrate, scan, explain the flagged prompts and generate them plainly and mitigated."""
    runtime = runtime or Runtime()
    source = ModelSource.resolve(config.model)
    if config.calibration is not None:
        Calibration.load(config.calibration)  # an unreadable file stops the audit before any work
    prompts = _prompts(config, source)
    index, encoder = config.index, config.encoder
    if index is None and source.reference is not None:
        index, encoder = source.reference
    reference = training_reference(index, encoder, runtime.device, source) if index else None
    training = _training_images(config.data, reference)
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    if denoiser.conditioning != "text":
        raise DiffmemError("an audit scores prompts: it needs a text-to-image model")
    name, given = parse_method_spec(config.mitigation or ("amg" if reference else "prompt_optimization"))
    attached = {"reference": reference} if name in TAKES_REFERENCE else {}
    mitigation_config(name, **calibrated_settings(name, given, None), **attached)  # checked before any work
    profile = model_profile(source, runtime, denoiser, *((index, encoder) if index else ()))
    detector = NoiseNormConfig(base_seed=runtime.seed, batch_size=config.batch_size)
    threshold = detection_threshold(
        source, config.calibration, "noise_norm", config_settings(detector), runtime, index, encoder
    )
    if threshold is None:
        raise DiffmemError(
            "no detection threshold applies to this model: give --calibration (diffmem calibrate)"
        )
    scores = noise_norm(denoiser, prompts, detector, progress=True).scores.tolist()
    flagged = [i for i in sorted(range(len(prompts)), key=lambda i: -scores[i]) if scores[i] > threshold]
    examined = flagged[: config.max_flagged]
    significance = SignificanceConfig(base_seed=runtime.seed, attribute_to=config.attribute_to)
    ordinary = ordinary_significance(source, significance, runtime, denoiser, index) if examined else None
    explanations = [
        token_significance(denoiser, prompts[i], significance, prompt_id=i, ordinary=ordinary)
        for i in examined
    ]
    carrying = [
        carrying_words(denoiser, e, threshold, significance.noise_norm_config(), i)
        for i, e in zip(examined, explanations)
    ]
    settings = calibrated_settings(name, given, profile, reference)
    method = mitigation_config(name, **settings, **attached)
    unflagged = [i for i in range(len(prompts)) if scores[i] <= threshold]
    drawn = min(config.unflagged_checked, len(unflagged)) if reference else 0
    checked = sorted(random.Random(runtime.seed).sample(unflagged, drawn))
    plain = ("none", mitigation_config("none"))
    images = {  # each prompt's generation is the one whose first step was scored (same seed)
        key: mitigated_generate(
            denoiser, [prompts[i] for i in ids], key_method, key_config, n_generations=1,
            base_seed=runtime.seed, prompt_ids=ids, batch_size=config.batch_size,
            sampling=SamplingOptions(), progress=True,
        ).images
        for key, ids, (key_method, key_config) in (
            ("plain", examined, plain), ("mitigated", examined, (name, method)), ("unflagged", checked, plain)
        )
        if ids
    }  # fmt: skip
    copies = Copies.between(images, reference, config.copy_threshold, training)
    summary = {
        "model": source.name,
        "model_hash": source.identity,
        "prompts": len(prompts),
        "threshold": threshold,
        "flagged": len(flagged),
        "examined": len(examined),
        "explanation": config.attribute_to,
        "ordinary_prompts": None if ordinary is None else ordinary.prompts,  # words weighed beyond theirs
        "mitigation": name,
        "mitigation_settings": settings,
        "unflagged_checked": len(checked),
        **copies.summary(),
    }
    table = _table(prompts, scores, threshold, examined, explanations, copies, carrying, checked)
    record = {**_plain(asdict(config)), **runtime.describe()}
    return Audit(table, explanations, images, copies, summary, record, carrying)


def _nearest_images(
    reference: ReferenceSet, rows: torch.Tensor, training: ImageSource | None
) -> torch.Tensor | None:
    """The index rows' training images: a pixel index's own, else read from its training set if given."""
    if reference.index.kind == "pixels":
        return reference.index.vectors(rows)
    return None if training is None else training.read(rows.tolist())


def _training_images(data: Path | None, reference: ReferenceSet | None) -> ImageSource | None:
    """The training set an embedding index was built from, checked to be the one (the same images, in
    the same order); None without ``data``."""
    if data is None:
        return None
    if reference is None or reference.index.kind != "embedding":
        raise DiffmemError("--data shows an embedding index's nearest training images: give that --index")
    training = image_source(data)
    if training.ids != reference.index.ids:
        raise DiffmemError(
            f"{data} is not the training set the index was built from: its images' ids differ from the "
            f"index's rows ({len(training.ids)} images, {len(reference.index.ids)} rows)"
        )
    return training


@dataclass(frozen=True)
class Copies:
    """The examined images' similarity to their nearest training image, plain and mitigated."""

    measure: str | None  # "copy_similarity", "nl2", or None without an index
    threshold: float | None  # a copy: above it (copy similarity) or below it (nL2)
    values: dict[str, list[float]]  # "plain"/"mitigated"/"unflagged" -> one value an image
    captions: dict[str, list[str]]  # the nearest training image's caption
    # the nearest training images [E, 3, H, W]: a pixel index's, or read from an embedding index's data
    nearest: dict[str, torch.Tensor | None]

    @classmethod
    def between(
        cls,
        images: dict[str, torch.Tensor],
        reference: ReferenceSet | None,
        threshold: float | None,
        training: ImageSource | None = None,
    ) -> Copies:
        if reference is None:
            return cls(None, None, {}, {}, {})
        values, captions, nearest = {}, {}, {}
        for key, batch in images.items():
            sigma, rows = training_similarity(batch, reference)
            values[key] = (-sigma if reference.measure == "nl2" else sigma).tolist()
            captions[key] = [reference.index.captions[int(r)] for r in rows]
            nearest[key] = _nearest_images(reference, rows.cpu(), training)
        chosen = COPY_THRESHOLDS[reference.measure] if threshold is None else threshold
        return cls(reference.measure, chosen, values, captions, nearest)

    def is_copy(self, value: float) -> bool:
        return value < self.threshold if self.measure == "nl2" else value > self.threshold

    def summary(self) -> dict[str, Any]:
        """The measure, its copy threshold, and the copies among the examined images, plain and mitigated,
        and among the unflagged prompts' images."""
        if self.measure is None:
            return {"measure": None}
        counts = {
            f"copies_{key}": sum(map(self.is_copy, self.values.get(key, [])))
            for key in ("plain", "mitigated", "unflagged")
        }
        return {"measure": self.measure, "copy_threshold": self.threshold, **counts}


def _table(
    prompts: list[str],
    scores: list[float],
    threshold: float,
    examined: list[int],
    explanations: list[TokenSignificance],
    copies: Copies,
    carrying: list[CarryingWords],
    checked: list[int],
) -> pa.Table:
    """One row per prompt: score and flag; for the examined ones the top word, the words carrying the
    prompt (none: no three words take it under the threshold), the score after each step of their search,
    and both similarities; for the unflagged ones generated, the plain image's similarity."""
    position = {i: k for k, i in enumerate(examined)}
    drawn = {i: k for k, i in enumerate(checked)}
    rows = []
    for i, (prompt, score) in enumerate(zip(prompts, scores)):
        k = position.get(i)
        row = {
            "prompt_id": i,
            "prompt": prompt,
            "score": score,
            "flagged": score > threshold,
            "examined": k is not None,
            "unflagged_checked": i in drawn,
        }
        row["top_word"] = (
            None
            if k is None
            else explanations[k].words[explanations[k].ranking(threshold)[0]]
            if explanations[k].words
            else None
        )
        row["carrying_words"] = None if k is None else carrying[k].named(explanations[k])
        row["scores_after_replacing"] = None if k is None else carrying[k].scores
        for key in ("plain", "mitigated"):
            row[f"similarity_{key}"] = None if k is None or not copies.values else copies.values[key][k]
        if i in drawn:
            row["similarity_plain"] = copies.values["unflagged"][drawn[i]]
        rows.append(row)
    return pa.Table.from_pylist(rows)


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}


def _prompts(config: AuditConfig, source: ModelSource) -> list[str]:
    if config.prompts is None:
        if source.labels is None:
            raise DiffmemError("give --prompts: only the shipped lab models come with their own prompts")
        return read_prompts(source.labels, config.column or "caption")
    prompts = [p for p in read_prompts(config.prompts, config.column or "prompt") if p.strip()]
    if not prompts:
        raise DiffmemError(f"{config.prompts} holds no non-empty prompts")
    return prompts

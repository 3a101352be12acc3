"""Evaluate detector settings and mitigations on a labelled prompt table: the Python side of
``diffmem eval detect`` and ``diffmem eval mitigate``."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from diffmem.core.denoiser import Denoiser
from diffmem.core.method_spec import parse_method_spec
from diffmem.data.lab_rows import is_lab_dataset
from diffmem.data.preprocess import preprocess
from diffmem.data.read import read_training_data
from diffmem.detect.evaluate import DEFAULT_SETTINGS, EvaluatedSetting, SettingSpec, evaluate_settings
from diffmem.errors import DiffmemError
from diffmem.io.atomic import write_atomic, write_json_atomic, write_parquet_atomic
from diffmem.io.prompts import READERS
from diffmem.io.run_record import environment
from diffmem.lab.alignment import alignment, load_reader
from diffmem.lab.dataset import load_lab_dataset
from diffmem.mitigate import ReferenceSet
from diffmem.mitigate.evaluate import (
    DEFAULT_METHODS,
    Measure,
    MitigationEvaluation,
    Quality,
    evaluate_mitigations,
    results_markdown,
)
from diffmem.mitigate.mitigation import SamplingOptions
from diffmem.mitigate.registry import TAKES_REFERENCE, mitigation_config
from diffmem.models.names import DEFAULT_MODEL, LAB_MODEL
from diffmem.models.source import ModelSource
from diffmem.models.spec import ModelSpec
from diffmem.report.detection_report import write_detection_report
from diffmem.workflows.calibrate import calibrated_settings, left_to_profile, model_profile
from diffmem.workflows.inputs import calibrated_guard, training_reference
from diffmem.workflows.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionEvalConfig:
    """A labelled prompt table, the model, and the detector settings to evaluate on it."""

    labels: Path
    model: str | ModelSpec = DEFAULT_MODEL
    settings: list[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS))  # detector:key=value,...
    prompt_column: str = "caption"
    label_column: str = "memorized"  # true for memorized prompts
    groups: list[str] | None = None  # keep only rows of these values of the `group` column


@dataclass(frozen=True)
class DetectionEvaluation:
    """Every setting's scores on the labelled prompts, with what produced them."""

    settings: list[EvaluatedSetting]
    prompts: list[str]
    truth: list[int]
    provenance: dict[str, Any]

    def save(self, out: Path) -> Path:
        """Write ``scores.parquet`` and the report (results, ROC curves, histograms, ``report.html``);
        returns the page's path."""
        out.mkdir(parents=True, exist_ok=True)
        scores = {"prompt": self.prompts, "memorized": self.truth} | {s.name: s.scores for s in self.settings}
        pq.write_table(pa.table(scores), out / "scores.parquet")
        return write_detection_report(self.settings, out, self.provenance)


def evaluate_detection(
    config: DetectionEvalConfig, runtime: Runtime | None = None, command: str | None = None
) -> DetectionEvaluation:
    """AUC, TPR at 1% and 3% FPR, UNet evaluations per prompt and wall time of each detector setting;
    ``command`` is recorded as what produced the report."""
    runtime = runtime or Runtime()
    specs = [SettingSpec.parse(text) for text in config.settings]
    if len({s.name for s in specs}) != len(specs):
        raise DiffmemError("each --setting must be given once")
    table = labelled_rows(config.labels, config.prompt_column, config.label_column, config.groups)
    prompts = table[config.prompt_column].to_pylist()
    truth = [int(v) for v in table[config.label_column].to_pylist()]
    if not 0 < sum(truth) < len(truth):
        raise DiffmemError(
            f"{config.labels.name} needs memorized and non-memorized prompts; "
            f"it has {sum(truth)} of {len(truth)} memorized"
        )
    source = ModelSource.resolve(config.model)
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    evaluated = evaluate_settings(denoiser, prompts, truth, specs, runtime.seed, progress=True)
    provenance = {
        "command": command,
        "model": source.name,
        "model_hash": source.identity,
        "labels": str(config.labels),
        "prompts": len(truth),
        "memorized": sum(truth),
        **runtime.describe(),
        **environment(),
    }
    return DetectionEvaluation(evaluated, prompts, truth, provenance)


def labelled_rows(path: Path, prompt_column: str, label_column: str, groups: list[str] | None) -> pa.Table:
    """The labelled rows of a prompt table, checked and filtered by group."""
    table = read_labels(path, [prompt_column, label_column, *(["group"] if groups else [])])
    if groups:
        table = table.filter(pc.is_in(table["group"], value_set=pa.array(groups)))
    if not pa.types.is_boolean(table[label_column].type) or table[label_column].null_count:
        raise DiffmemError(f"column {label_column!r} of {path.name} must be true/false on every row")
    return table


def read_labels(path: Path, columns: list[str]) -> pa.Table:
    """A prompt table (.parquet, .jsonl or .csv) that has ``columns``."""
    if not path.is_file():
        raise DiffmemError(f"labels file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DiffmemError(f"unsupported labels file {path.name}; use .parquet, .jsonl or .csv")
    try:
        table = reader(path)
    except (pa.ArrowException, OSError) as error:
        raise DiffmemError(f"could not read {path}: {str(error).splitlines()[0]}") from None
    for column in columns:
        if column not in table.column_names:
            raise DiffmemError(
                f"{path.name} has no column {column!r}; columns: {', '.join(table.column_names)}"
            )
    return table


@dataclass(frozen=True)
class MitigationEvalConfig:
    """The memorized and control groups of a labelled table, the methods, and how each image is judged."""

    model: str | ModelSpec = LAB_MODEL
    labels: Path | None = None  # with a `group` column (default: a shipped model's labels.parquet)
    indexes: list[Path] = field(default_factory=list)  # each adds its measure (default: a shipped model's)
    encoder: Path | None = None  # an embedding index's encoder (default: the one it records)
    amg_index: Path | None = None  # what AMG guides against (default: the first embedding index)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # NAME[:key=value,...]
    memorized_group: str = "memorized"
    control_group: str = "heldout"
    prompt_column: str = "caption"
    max_prompts_per_group: int | None = None
    nl2_threshold: float = 1.4  # memorized below this nL2 (SPEC §5)
    copy_threshold: float = 0.5  # memorized above this copy similarity
    data: Path | None = None  # FID/KID's real images: a lab dataset's control scenes, or any training data
    reader: Path | None = None  # the lab's attribute reader: text alignment, and FID/KID features
    n_generations: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 16
    guard: bool = False  # each method applies only to prompts above the calibrated threshold
    calibration: Path | None = None  # the guard's (default: a shipped model's own)


@dataclass(frozen=True)
class MitigationReport:
    """Each method's memorization, quality and cost (the AMG paper's table), with one row per image."""

    results: list[MitigationEvaluation]
    record: dict[str, Any]

    @property
    def markdown(self) -> str:
        """The results table."""
        return results_markdown(self.results)

    def save(self, out: Path) -> None:
        """Write ``images.parquet``, ``results.md`` and ``results.json`` into ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        rows = pa.concat_tables([r.rows for r in self.results], promote_options="default")
        write_parquet_atomic(rows, out / "images.parquet")
        write_atomic(out / "results.md", self.markdown.encode())
        write_json_atomic(out / "results.json", self.record)


def evaluate_mitigation(
    config: MitigationEvalConfig, runtime: Runtime | None = None, command: str | None = None
) -> MitigationReport:
    """Generate both groups' prompts with every method and measure them against the training set."""
    runtime = runtime or Runtime()
    source = ModelSource.resolve(config.model)
    labels = config.labels or source.labels
    if labels is None:
        raise DiffmemError("give --labels: only the shipped lab model comes with its own labelled prompts")
    table = _grouped(labels, config.prompt_column, [config.memorized_group, config.control_group])
    groups = {
        name: table.filter(pc.equal(table["group"], name))[config.prompt_column].to_pylist()[
            : config.max_prompts_per_group
        ]
        for name in (config.memorized_group, config.control_group)
    }
    indexes, encoder = config.indexes, config.encoder
    if not indexes:
        if source.reference is None:
            raise DiffmemError("give --index: only the shipped lab model comes with its training-set index")
        indexes, encoder = [source.reference[0]], source.reference[1]
    references = [training_reference(path, encoder, runtime.device, source) for path in indexes]
    thresholds = {"nl2": config.nl2_threshold, "copy_similarity": config.copy_threshold}
    measures = [Measure(r, thresholds[r.measure]) for r in references]
    amg_index = config.amg_index or indexes[references.index(_amg_default(references))]
    chosen = training_reference(amg_index, encoder, runtime.device, source)
    reader = load_reader(config.reader, runtime.device) if config.reader else None
    specs = [parse_method_spec(m) for m in config.methods]
    for name, given in specs:  # every method's settings checked before any work
        reference = {"reference": chosen} if name in TAKES_REFERENCE else {}
        mitigation_config(name, **calibrated_settings(name, {**given, **reference}, None))
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    quality = _quality(config, table, references, reader, denoiser, runtime.seed)
    left = set().union(*(left_to_profile(name, given) for name, given in specs))
    guarded = config.guard and config.calibration is None and source.calibration is None
    profile = None
    if (left or guarded) and denoiser.conditioning == "text":
        # against the AMG index, whichever methods run: one profile per model and index for every method
        profile = model_profile(source, runtime, denoiser, amg_index, encoder)
    guard = calibrated_guard(source, config.calibration, profile) if config.guard else None
    results = evaluate_mitigations(
        denoiser,
        groups,
        config.methods,
        measures,
        chosen,
        n_generations=config.n_generations,
        sampling=SamplingOptions(config.num_inference_steps, config.guidance_scale),
        base_seed=runtime.seed,
        batch_size=config.batch_size,
        quality=quality,
        control_group=config.control_group,
        alignment=None if reader is None else partial(alignment, reader),
        guard=guard,
        defaults=lambda name, settings: calibrated_settings(name, settings, profile, chosen),
        progress=True,
    )
    record = {
        "command": command,
        "model": source.name,
        "model_hash": source.identity,
        "labels": str(labels),
        "prompts": {g: len(p) for g, p in groups.items()},
        "n_generations": config.n_generations,
        "indexes": [str(p) for p in indexes],
        "amg_index": str(config.amg_index) if config.amg_index else None,
        "guard_threshold": None if guard is None else guard.threshold,
        **runtime.describe(),
        "results": [_result_record(r) for r in results],
        **environment(),
    }
    return MitigationReport(results, record)


def _amg_default(references: list[ReferenceSet]) -> ReferenceSet:
    """The index AMG guides against when none is named: the first embedding index, else the first."""
    return ([r for r in references if r.measure == "copy_similarity"] or references)[0]


def _result_record(result: MitigationEvaluation) -> dict[str, Any]:
    summaries = {g: {m: s.to_dict() for m, s in ms.items()} for g, ms in result.summaries.items()}
    return {
        "name": result.name,
        "settings": result.settings,
        "summaries": summaries,
        "fid": result.fid,
        "kid": result.kid,
        "alignment": result.alignment,
        "seconds_per_image": result.seconds_per_image,
        "unet_evaluations_per_image": result.unet_evaluations_per_image,
        "guided_share": result.guided_share,
    }


def _grouped(path: Path, prompt_column: str, groups: list[str]) -> pa.Table:
    """The rows of the groups, checked."""
    table = read_labels(path, [prompt_column, "group"])
    present = set(table["group"].to_pylist())
    missing = [g for g in groups if g not in present]
    if missing:
        raise DiffmemError(
            f"{path.name} has no rows of group {', '.join(missing)}; "
            f"groups: {', '.join(sorted(map(str, present)))}"
        )
    return table


def _quality(
    config: MitigationEvalConfig,
    table: pa.Table,
    references: list[ReferenceSet],
    reader: Any,
    denoiser: Denoiser,
    seed: int,
) -> Quality | None:
    """FID/KID inputs and the feature network (the attribute reader's glimpse features, else the copy
    detector's embedding): a lab dataset's real scenes of the control group, or as many images of any
    other training data, drawn with ``seed`` and prepared at the model's resolution."""
    if config.data is None:
        return None
    networks = [r.encoder for r in references if r.encoder is not None]
    if reader is not None:
        networks.insert(0, reader.encoder)
    if not networks:
        raise DiffmemError("FID/KID needs a feature network: --reader, or an embedding index's encoder")
    rows = table.filter(pc.equal(table["group"], config.control_group))[: config.max_prompts_per_group]
    if not is_lab_dataset(Path(config.data)):
        return Quality(_real_sample(config.data, len(rows), _resolution(denoiser), seed), networks[0])
    if "scene_id" not in table.column_names:
        raise DiffmemError("FID/KID against a lab dataset needs the labels' scene ids (a scene_id column)")
    return Quality(load_lab_dataset(config.data).images(rows["scene_id"].to_pylist()), networks[0])


def _real_sample(data: Path, count: int, resolution: int, seed: int) -> torch.Tensor:
    """``count`` distinct images of the training data at ``data`` (any layout), centre-cropped to
    ``resolution``, in [0, 1] [N, 3, H, W]."""
    read = read_training_data(data, require_captions=False)
    log.info("FID/KID reference: %s", read.report.summary())
    images = read.unique_images()
    if len(images) < 2:
        raise DiffmemError(f"{data} holds {len(images)} usable image(s); FID/KID needs at least 2")
    chosen = sorted(random.Random(seed).sample(range(len(images)), min(count, len(images))))
    return torch.stack([(preprocess(images[i].load(), resolution) + 1) / 2 for i in chosen])


def _resolution(denoiser: Denoiser) -> int:
    """The side of the images the model decodes."""
    with torch.no_grad():
        latent = torch.zeros((1, *denoiser.sample_shape), device=denoiser.device, dtype=denoiser.dtype)
        return int(denoiser.decode(latent).shape[-1])

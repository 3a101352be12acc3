"""Scan a prompt list with a detector into a resumable scan directory, and calibrate a detector's
threshold: the Python side of ``diffmem scan`` and ``diffmem calibrate``."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from diffmem.detect.calibration import Calibration, calibrate
from diffmem.detect.distributed_scan import distributed_scan_prompts
from diffmem.detect.ray_scan import RayOptions, ray_scan_prompts
from diffmem.detect.registry import config_settings, detector_config
from diffmem.detect.scan import ScanJob, scan_prompts
from diffmem.detect.scan_store import SETTINGS_FILE, SUMMARY_FILE, ScanStore
from diffmem.errors import DiffmemError
from diffmem.io.output_dirs import check_output_file
from diffmem.io.prompts import read_prompt_records, read_prompts
from diffmem.io.run_record import write_summary
from diffmem.models.names import LAB_MODEL
from diffmem.models.source import ModelSource, open_model
from diffmem.models.spec import ModelSpec
from diffmem.report.scan_histogram import write_scan_histogram
from diffmem.workflows.runtime import Runtime
from diffmem.workflows.thresholds import detection_threshold

ENGINES = ("local", "ray", "accelerate")
MODES = ("new", "resume", "overwrite")
HISTOGRAM_FILE = "scores.png"


@dataclass(frozen=True)
class ScanConfig:
    """What to scan and how; ``prompts`` None scans a shipped lab model's own labelled prompts."""

    prompts: Path | None = None
    model: str | ModelSpec = LAB_MODEL
    column: str | None = None  # default "prompt" ("caption" for a shipped model's prompts)
    id_column: str | None = None  # default: line or row number ("prompt_id" for a shipped model's)
    detector: str = "noise_norm"
    settings: dict[str, Any] = field(default_factory=dict)  # detector settings over its defaults
    calibration: Path | None = None  # flags prompts above it (default: a shipped model's own, if it applies)
    index: Path | None = None  # without a calibration: the model's profile against this training-set index
    encoder: Path | None = None  # an embedding index's encoder (default: the one it records)
    chunk_size: int = 256  # prompts per committed part file
    engine: str = "local"  # local, ray or accelerate
    workers: int | None = None  # Ray actors (default: one per visible GPU, else 1)
    ray_address: str | None = None
    gpus_per_worker: float | None = None  # default: 1 on CUDA, else 0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise DiffmemError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        ray_only = (self.workers, self.ray_address, self.gpus_per_worker)
        if self.engine != "ray" and any(v is not None for v in ray_only):
            raise DiffmemError("--workers, --ray-address and --gpus-per-worker apply to --engine ray only")
        if self.chunk_size < 1:
            raise DiffmemError(f"--chunk-size must be at least 1; got {self.chunk_size}")


@dataclass(frozen=True)
class ScanResult:
    """A finished scan: one row per prompt (``scan_store.SCHEMA``), its summary and run record."""

    table: pa.Table
    summary: dict[str, Any]
    config: dict[str, Any]
    threshold: float | None

    def save(self, out: Path) -> Path | None:
        """Write the summary and the scores' histogram (the rows are in ``out`` already); returns the
        histogram's path, or None when no row has a score to plot."""
        write_summary(out / SUMMARY_FILE, self.config, self.summary)
        return write_scan_histogram(self.table, self.threshold, out / HISTOGRAM_FILE)


def scan(
    config: ScanConfig, out: Path, mode: str = "new", runtime: Runtime | None = None
) -> ScanResult | None:
    """Score every prompt into the scan directory ``out`` (``mode``: new, resume or overwrite); its rows
    are committed there as they are scored, the summary with :meth:`ScanResult.save`. Returns None in the
    processes of an accelerate launch other than the main one."""
    runtime = runtime or Runtime()
    if mode not in MODES:
        raise DiffmemError(f"unknown scan mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "resume" and not (out / SETTINGS_FILE).is_file():
        raise DiffmemError(f"nothing to resume: {out} holds no scan; drop --resume to start one")
    source = ModelSource.resolve(config.model)
    prompts, column, id_column = _prompt_file(config, source)
    records = read_prompt_records(prompts, column, id_column)
    if not records:
        raise DiffmemError(f"{prompts} holds no prompts")
    detector = detector_config(config.detector, base_seed=runtime.seed, **config.settings)
    settings = config_settings(detector)
    threshold = None  # nothing to flag: no calibration is measured for prompts that cannot be scored
    if any(r.status == "ok" for r in records):
        threshold = detection_threshold(
            source, config.calibration, config.detector, settings, runtime, config.index, config.encoder
        )
    job = ScanJob(
        source.spec,
        str(runtime.device),
        runtime.dtype,
        config.detector,
        detector,
        threshold,
        source.identity,
        runtime.speedups,
    )
    gpus = _gpus_per_worker(config, runtime)
    if config.engine == "ray" and gpus > 0 and runtime.device.type != "cuda":
        job = replace(job, device="cuda")  # the actors hold the GPUs; the dtype applies as given
    store_settings = {
        "model_hash": source.identity,
        "detector": config.detector,
        "settings": {k: v for k, v in settings.items() if k != "batch_size"},
        "prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(),
        "column": column,
        "id_column": id_column,
        "threshold": threshold,
        "device_type": torch.device(job.device).type,  # scores differ by device and dtype at float precision
        "dtype": str(job.dtype).removeprefix("torch."),
    }
    if config.engine == "accelerate":
        finished = distributed_scan_prompts(
            job, open_model, records, out, store_settings, mode, config.chunk_size
        )
        if finished is None:  # not the main process: it has committed its rows
            return None
        table, summary = finished
    elif config.engine == "ray":
        cuda = runtime.device.type == "cuda"
        workers = config.workers or (torch.cuda.device_count() if cuda else 1)
        options = RayOptions(workers=workers, gpus_per_worker=gpus, address=config.ray_address)
        store = ScanStore(out, store_settings, mode)
        table, summary = ray_scan_prompts(job, open_model, records, store, options, config.chunk_size)
    else:
        store = ScanStore(out, store_settings, mode)
        scanner = job.scanner(open_model, job.device)
        table, summary = scan_prompts(scanner, records, store, source.identity, config.chunk_size)
    record = {
        **store_settings,
        "model": source.name,
        "prompts": str(prompts),
        **runtime.describe(),
        "speedups": asdict(runtime.speedups),
        "calibration": None if config.calibration is None else str(config.calibration),
        "index": None if config.index is None else str(config.index),
    }
    return ScanResult(table, summary, record, threshold)


def _prompt_file(config: ScanConfig, source: ModelSource) -> tuple[Path, str, str | None]:
    """The prompt file with its prompt and id columns: given, or the shipped model's labelled prompts."""
    if config.prompts is not None:
        return config.prompts, config.column or "prompt", config.id_column
    if source.labels is None:
        raise DiffmemError("give --prompts: only the shipped lab models come with their own prompt set")
    return source.labels, config.column or "caption", config.id_column or "prompt_id"


def _gpus_per_worker(config: ScanConfig, runtime: Runtime) -> float:
    if config.gpus_per_worker is not None:
        return config.gpus_per_worker
    return 1.0 if runtime.device.type == "cuda" else 0.0


@dataclass(frozen=True)
class CalibrateConfig:
    """Prompts known not to be memorized, and the detector whose threshold to place among them."""

    prompts: Path
    model: str | ModelSpec | None = None  # default: the tiny random-weight pipeline
    column: str = "prompt"
    target_fpr: float = 0.01
    detector: str = "noise_norm"
    settings: dict[str, Any] = field(default_factory=dict)


def calibrate_detector(
    config: CalibrateConfig, runtime: Runtime | None = None, out: Path | None = None, overwrite: bool = False
) -> Calibration:
    """Choose the detection threshold at ``target_fpr`` of the prompts; saved to ``out`` when given
    (an existing file only with ``overwrite``)."""
    runtime = runtime or Runtime()
    if out is not None:
        check_output_file(out, overwrite)
    detector = detector_config(config.detector, base_seed=runtime.seed, **config.settings)
    texts = [p for p in read_prompts(config.prompts, config.column) if p.strip()]
    if not texts:
        raise DiffmemError(f"{config.prompts} holds no non-empty prompts")
    source = ModelSource.resolve(config.model)
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    result = calibrate(
        denoiser, texts, config.detector, detector, source.identity, config.target_fpr, progress=True
    )
    if out is not None:
        result.save(out)
    return result

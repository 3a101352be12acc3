"""Evaluate detector settings on a labelled prompt table: the Python side of ``diffmem eval detect``, and
the labelled-table readers ``eval mitigate`` shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffmem.detect.evaluate import DEFAULT_SETTINGS, EvaluatedSetting, SettingSpec, evaluate_settings
from diffmem.errors import DiffmemError
from diffmem.model_names import DEFAULT_MODEL
from diffmem.models import ModelSource
from diffmem.prompts_io import READERS
from diffmem.report.detection_report import write_detection_report
from diffmem.run_record import environment
from diffmem.workflows.runtime import Runtime


@dataclass(frozen=True)
class DetectionEvalConfig:
    """A labelled prompt table, the model, and the detector settings to evaluate on it."""

    labels: Path
    model: str = DEFAULT_MODEL
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

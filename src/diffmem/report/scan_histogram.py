"""The picture of a scan: its scores as a histogram, with the calibrated threshold and the flagged share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from diffmem.io.atomic import write_atomic
from diffmem.report.detection_report import png_bytes


def write_scan_histogram(table: pa.Table, threshold: float | None, path: Path) -> Path | None:
    """A PNG of the scan's finite scores and, when calibrated, its threshold; None when nothing was scored."""
    detector = table["detector"][0].as_py() if table.num_rows else "score"
    figure = score_histogram(table["score"].to_pylist(), threshold, detector)
    if figure is None:
        return None
    write_atomic(path, png_bytes(figure))
    return path


def score_histogram(values: list[float | None], threshold: float | None, detector: str) -> Figure | None:
    """The finite scores as a histogram with the threshold and the share above it; None when none is finite."""
    scores = np.asarray([s for s in values if s is not None], dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        return None
    figure = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = figure.subplots()
    ax.hist(scores, bins=min(60, max(10, len(scores) // 10)), color="tab:blue", alpha=0.8)
    title = f"{len(scores)} prompts scored"
    if threshold is not None:
        flagged = int((scores > threshold).sum())
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.legend(fontsize="small")
        title += f", {flagged} ({flagged / len(scores):.1%}) above the threshold"
    ax.set(xlabel=f"{detector} score (higher: more likely memorized)", ylabel="prompts", title=title)
    return figure

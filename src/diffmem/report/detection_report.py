"""A detection report: how well, and at what cost, each evaluated setting separates memorized prompts.

SPEC §1: report AUC, TPR at 1% and 3% FPR from the shared ROC curve (:mod:`diffmem.metrics.roc`) and
the UNet evaluations spent per prompt. One call writes ``results.json``, ``results.md``, ``roc.png``,
``histograms.png`` and ``report.html``, a page that needs no other file.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffmem.detect.evaluate import EvaluatedSetting
from diffmem.errors import DiffmemError
from diffmem.io.atomic import write_atomic
from diffmem.metrics.roc import Roc, detection_metrics, roc, tpr_key
from diffmem.report.html import image, page, table

TITLE = "Memorization detection report"
REPORT_FPRS = (0.01, 0.03)
HEADER = ("Setting", "AUC", "TPR@1%FPR", "TPR@3%FPR", "UNet evals/prompt", "Wall s")


def write_detection_report(settings: Sequence[EvaluatedSetting], out_dir: Path, provenance: dict) -> Path:
    """Write the results table, ROC curves, score histograms and an HTML page of them into ``out_dir``.

    Returns the path of ``report.html``. ``provenance`` (the command, configuration, versions) is
    recorded in ``results.json`` and shown on the page.
    """
    settings = _checked(settings)
    metrics = [detection_metrics(s.scores, s.labels, REPORT_FPRS) for s in settings]
    rows = [_row(s, m) for s, m in zip(settings, metrics, strict=True)]
    notes = _dropped_notes(settings, metrics)
    roc_png = png_bytes(_roc_figure(settings, [roc(s.scores, s.labels) for s in settings]))
    histograms_png = png_bytes(_histogram_figure(settings))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", _results_json(settings, metrics, provenance).encode())
    write_atomic(out_dir / "results.md", _markdown(rows, notes).encode())
    write_atomic(out_dir / "roc.png", roc_png)
    write_atomic(out_dir / "histograms.png", histograms_png)
    document = _html_page(provenance, rows, notes, settings, roc_png, histograms_png)
    write_atomic(out_dir / "report.html", document.encode())
    return out_dir / "report.html"


def _checked(settings: Sequence[EvaluatedSetting]) -> list[EvaluatedSetting]:
    settings = list(settings)
    if not settings:
        raise DiffmemError("a detection report needs at least one evaluated setting")
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise DiffmemError(f"setting names must be unique to tell rows apart; got {names}")
    return settings


def _row(setting: EvaluatedSetting, metrics: dict) -> tuple[str, ...]:
    """One table row, formatted: the same cells in Markdown and HTML."""
    tprs = [f"{metrics[tpr_key(fpr)]:.3f}" for fpr in REPORT_FPRS]
    evaluations = f"{setting.unet_evaluations_per_prompt:g}"
    return (setting.name, f"{metrics['auc']:.3f}", *tprs, evaluations, f"{setting.wall_s:.1f}")


def _dropped_notes(settings: Sequence[EvaluatedSetting], metrics: Sequence[dict]) -> list[str]:
    return [
        f"{s.name}: {m['n_dropped_nonfinite']} prompts with a non-finite score left out"
        for s, m in zip(settings, metrics, strict=True)
        if m["n_dropped_nonfinite"]
    ]


def _results_json(settings: Sequence[EvaluatedSetting], metrics: Sequence[dict], provenance: dict) -> str:
    records = [
        {
            "name": s.name,
            "detector": s.detector,
            "settings": s.settings,
            "metrics": m,
            "unet_evaluations_per_prompt": s.unet_evaluations_per_prompt,
            "wall_s": s.wall_s,
            "prompts_per_s": len(s.scores) / s.wall_s,
        }
        for s, m in zip(settings, metrics, strict=True)
    ]
    return json.dumps({"provenance": provenance, "settings": records}, indent=2, default=str) + "\n"


def _markdown(rows: Sequence[tuple[str, ...]], notes: Sequence[str]) -> str:
    table = "\n".join([_markdown_row(HEADER), "|" + " --- |" * len(HEADER), *map(_markdown_row, rows)])
    return "\n\n".join([table, *notes]) + "\n"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", r"\|").replace("\n", " ") for cell in cells) + " |"


def _roc_figure(settings: Sequence[EvaluatedSetting], curves: Sequence[Roc]) -> Figure:
    figure = Figure(figsize=(6, 5.5), layout="constrained")
    ax = figure.add_subplot()
    for setting, curve in zip(settings, curves, strict=True):
        ax.plot(curve.fpr, curve.tpr, label=f"{_plain(setting.name)} (AUC {curve.auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax.set(xlabel="False-positive rate", ylabel="True-positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("ROC curves")
    ax.legend(loc="lower right", fontsize="small")
    return figure


def _histogram_figure(settings: Sequence[EvaluatedSetting]) -> Figure:
    columns = min(3, len(settings))
    rows = math.ceil(len(settings) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.5 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, setting in zip(axes, settings):
        _histogram(ax, setting)
    for ax in axes[len(settings) :]:
        ax.set_visible(False)
    return figure


def _histogram(ax: Axes, setting: EvaluatedSetting) -> None:
    """Finite scores of memorized and non-memorized prompts over shared bins."""
    scores = np.asarray(setting.scores, dtype=np.float64)
    labels = np.asarray(setting.labels)
    finite = np.isfinite(scores)
    bins = np.histogram_bin_edges(scores[finite], bins=30)
    for label, name, color in ((0, "not memorized", "tab:blue"), (1, "memorized", "tab:red")):
        ax.hist(scores[finite & (labels == label)], bins=bins, alpha=0.6, color=color, label=name)
    ax.set(xlabel="score", ylabel="prompts")
    ax.set_title(_plain(setting.name), fontsize="medium")
    ax.legend(fontsize="small")


def _plain(text: str) -> str:
    """``text`` shown literally by matplotlib, which reads ``$...$`` as math."""
    return text.replace("$", r"\$")


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _html_page(
    provenance: dict,
    rows: Sequence[tuple[str, ...]],
    notes: Sequence[str],
    settings: Sequence[EvaluatedSetting],
    roc_png: bytes,
    histograms_png: bytes,
) -> str:
    provenance_rows = [(str(key), _text(value)) for key, value in provenance.items()]
    setting_rows = [(s.name, s.detector, _text(s.settings)) for s in settings]
    body = [
        f"<h1>{html.escape(TITLE)}</h1>",
        "<h2>Provenance</h2>",
        table(("Key", "Value"), provenance_rows),
        "<h2>Results</h2>",
        table(HEADER, rows),
        *(f"<p>{html.escape(note)}</p>" for note in notes),
        "<h2>ROC curves</h2>",
        image(roc_png, "ROC curves of all settings"),
        "<h2>Score histograms</h2>",
        image(histograms_png, "Score histograms of memorized and non-memorized prompts"),
        "<h2>Settings</h2>",
        table(("Setting", "Detector", "Settings"), setting_rows),
    ]
    return page(TITLE, body)


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)

"""An audit as one self-contained page: what was checked, the scores against the threshold, each
examined prompt with its words heat-mapped, its plain and mitigated image and their nearest training
image, and the unflagged prompts whose plain image is a copy."""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

from diffmem.explain.carrying_words import carrying_verdict
from diffmem.report.detection_report import png_bytes
from diffmem.report.explanation_page import heat_mapped
from diffmem.report.html import image, page, png, table
from diffmem.report.scan_histogram import score_histogram

if TYPE_CHECKING:
    from diffmem.workflows.audit import Audit

PICTURE = "width:10em;margin:0.2em"


def audit_page(result: Audit) -> str:
    """The HTML document of an audit."""
    summary = result.summary
    histogram = score_histogram(result.table["score"].to_pylist(), summary["threshold"], "noise_norm")
    body = [
        f"<h1>Memorization audit of {html.escape(summary['model'])}</h1>",
        f"<p>{_verdict(summary)}</p>",
        table(("", ""), [(k.replace("_", " "), _text(v)) for k, v in summary.items()]),
        "<h2>Scores</h2>",
        "" if histogram is None else image(png_bytes(histogram), "score histogram"),
        f"<h2>Flagged prompts ({summary['examined']} of {summary['flagged']} examined, highest scores first)</h2>",
        *(_examined(result, k) for k in range(summary["examined"])),
        *_unflagged_copies(result),
        "<h2>Provenance</h2>",
        table(("Key", "Value"), [(k, _text(v)) for k, v in result.record.items()]),
    ]
    return page("diffmem audit", body)


def _verdict(summary: dict) -> str:
    line = f"{summary['flagged']} of {summary['prompts']} prompts score above the threshold {summary['threshold']:.4g}."
    if summary.get("measure") is not None:
        line += (
            f" Of the {summary['examined']} examined, {summary['copies_plain']} generate a copy plainly "
            f"and {summary['copies_mitigated']} with {summary['mitigation']}."
        )
        if summary["unflagged_checked"]:
            line += (
                f" Of {summary['unflagged_checked']} unflagged prompts drawn at random and generated "
                f"plainly, {summary['copies_unflagged']} generate a copy the score does not flag."
            )
    return html.escape(line)


def _examined(result: Audit, k: int) -> str:
    explanation, copies = result.explanations[k], result.copies
    pictures = [_figure(result.images["plain"][k], "plain")]
    if copies.measure is not None and copies.nearest["plain"] is not None:
        pictures.append(_figure(copies.nearest["plain"][k], "nearest training image"))
    pictures.append(_figure(result.images["mitigated"][k], result.summary["mitigation"]))
    lines = [f"noise-norm score {explanation.score:.4f}"]
    if result.carrying:
        carried = result.carrying[k]
        lines.append(carrying_verdict(carried.named(explanation), carried.scores, quote=lambda w: f"“{w}”"))
    if copies.measure is not None:
        for key in ("plain", "mitigated"):
            value = copies.values[key][k]
            verdict = "copy" if copies.is_copy(value) else "not a copy"
            lines.append(f"{key}: {copies.measure} {value:.3f} ({verdict}) to “{copies.captions[key][k]}”")
    return (
        "<div style='border-top:1px solid #ccc;padding:0.5em 0'>"
        f"<p style='font-size:1.2em;line-height:1.8'>{heat_mapped(explanation)}</p>"
        f"<div>{''.join(pictures)}</div>"
        f"<p>{'<br>'.join(html.escape(line) for line in lines)}</p></div>"
    )


def _unflagged_copies(result: Audit) -> list[str]:
    """A section on the unflagged prompts whose plain image is a copy, each beside its nearest training
    image; nothing when none was generated."""
    copies, rows = result.copies, result.table.to_pylist()
    drawn = [row for row in rows if row["unflagged_checked"]]  # in the order they were generated
    if not drawn:
        return []
    found = [k for k, row in enumerate(drawn) if copies.is_copy(row["similarity_plain"])]
    parts = [f"<h2>Unflagged prompts that copy ({len(found)} of {len(drawn)} drawn at random)</h2>"]
    for k in found:
        row = drawn[k]
        pictures = [_figure(result.images["unflagged"][k], "plain")]
        if copies.nearest["unflagged"] is not None:
            pictures.append(_figure(copies.nearest["unflagged"][k], "nearest training image"))
        nearest = copies.captions["unflagged"][k]
        measured = f"noise-norm score {row['score']:.4f}; {copies.measure} {row['similarity_plain']:.3f}"
        lines = [row["prompt"], f"{measured} to “{nearest}”"]
        parts.append(
            "<div style='border-top:1px solid #ccc;padding:0.5em 0'>"
            f"<div>{''.join(pictures)}</div><p>{'<br>'.join(html.escape(line) for line in lines)}</p></div>"
        )
    return parts


def _figure(picture, caption: str) -> str:
    return (
        "<figure style='display:inline-block;margin:0.2em'>"
        f"{image(png(picture), caption, PICTURE)}<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)

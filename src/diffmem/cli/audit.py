"""``diffmem audit``: the release check of :mod:`diffmem.workflows.audit`, its report written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.app import app
from diffmem.cli.model_options import with_model_options
from diffmem.cli.scan import EncoderOption
from diffmem.models.names import LAB_MODEL

Model = Annotated[
    str,
    typer.Option(
        help="Diffusers directory, Hub id, .safetensors/.ckpt file or builtin:NAME (default: the shipped lab model)."
    ),
]
Prompts = Annotated[
    Path | None,
    typer.Option(help="The prompts to check (.txt, .jsonl, .csv, .parquet; default: the lab model's own)."),
]
Column = Annotated[str | None, typer.Option(help="Prompt column of a tabular file (default prompt).")]
Index = Annotated[
    Path | None,
    typer.Option(
        help="Training-set index (diffmem index build): similarity, AMG (default: the lab model's)."
    ),
]
Calibration = Annotated[
    Path | None, typer.Option(help="A calibration file (default: the model's self-calibration).")
]
Mitigation = Annotated[
    str | None,
    typer.Option(help="NAME[:key=value,...] (default: amg with an index, else prompt_optimization)."),
]
MaxFlagged = Annotated[int, typer.Option(help="Explain and generate at most this many flagged prompts.")]
UnflaggedChecked = Annotated[
    int,
    typer.Option(
        help="Generate this many unflagged prompts (a random draw) plainly and count the copies the "
        "score misses (needs an index; 0: none)."
    ),
]
CopyThreshold = Annotated[
    float | None, typer.Option(help="A copy: copy similarity above (default 0.5) or nL2 below (default 1.4).")
]
Data = Annotated[
    Path | None,
    typer.Option(
        help="The training set an embedding --index was built from: the report shows each image's nearest "
        "training image (a pixel index holds them)."
    ),
]
Out = Annotated[Path, typer.Option(help="Report directory: report.html, audit.parquet, summary.json.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an earlier audit in --out.")]


@app.command()
@with_model_options
def audit(
    ctx: typer.Context,
    model: Model = LAB_MODEL,
    prompts: Prompts = None,
    column: Column = None,
    index: Index = None,
    encoder: EncoderOption = None,
    calibration: Calibration = None,
    mitigation: Mitigation = None,
    max_flagged: MaxFlagged = 32,
    unflagged_checked: UnflaggedChecked = 16,
    copy_threshold: CopyThreshold = None,
    data: Data = None,
    out: Out = Path("out/audit"),
    overwrite: Overwrite = False,
) -> None:
    """Calibrate, scan, explain every flagged prompt, generate it plainly and mitigated, and count the
    copies among a random draw of unflagged prompts: one HTML report."""
    from diffmem.io.output_dirs import check_output_dir
    from diffmem.workflows.audit import OUTPUTS, AuditConfig
    from diffmem.workflows.audit import audit as run_audit

    check_output_dir(out, OUTPUTS, overwrite)  # before any work
    config = AuditConfig(
        model, prompts, column, index, encoder, calibration, mitigation, max_flagged,
        unflagged_checked=unflagged_checked, copy_threshold=copy_threshold, data=data,
    )  # fmt: skip
    result = run_audit(config, ctx.obj.runtime)
    result.save(out, overwrite)
    typer.echo(_verdict(result.summary, out))


def _verdict(summary: dict, out: Path) -> str:
    """The audit in one line: how many prompts were flagged and examined, and the copies among them."""
    copies = (
        ""
        if summary.get("measure") is None
        else f"; copies among them {summary['copies_plain']} plain, {summary['copies_mitigated']} with "
        f"{summary['mitigation']}; {summary['copies_unflagged']} of {summary['unflagged_checked']} unflagged "
        "prompts generated copy"
    )
    return (
        f"{summary['flagged']} of {summary['prompts']} prompts flagged (threshold {summary['threshold']:.4g}); "
        f"{summary['examined']} examined{copies}; wrote {out / 'report.html'}"
    )

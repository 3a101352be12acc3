"""Training policies side by side: reads the `diffmem eval mitigate` record of each fine-tuned model and
tabulates, against a baseline run, the memorized captions' copy share (copy similarity and nL2), the
held-out copies, FID/KID and held-out alignment, with each model's training record (t_n, filter drop
rate, deduplication). With --plot, memorized copy share against FID, one point per run.

    python benchmarks/policy_comparison.py --baseline none --run none=out/ftk-eval-base \\
        --run dedup=out/ftk-eval-dedup --run ambient_2=out/ftk-eval-ambients20 \\
        --markdown out/policies.md --plot docs/policies.png --out out/policies.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmem.io.run_record import environment
from support import labelled_scatter, report

MEASURES = ("copy_similarity", "nl2")


def main(argv: list[str] | None = None) -> dict:
    """Tabulate every run against the baseline; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    runs = dict(_run(spec, args.method) for spec in args.run)
    if args.baseline not in runs:
        raise SystemExit(f"--baseline {args.baseline!r} is not one of the --run names: {', '.join(runs)}")
    base = runs[args.baseline]
    for row in runs.values():
        row["memorized_change"] = _change(row["memorized_copy"], base["memorized_copy"])
        row["fid_ratio"] = row["fid"] / base["fid"] if row["fid"] and base["fid"] else None
        row["alignment_change_points"] = (
            100 * (row["heldout_alignment"] - base["heldout_alignment"])
            if row["heldout_alignment"] is not None and base["heldout_alignment"] is not None
            else None
        )
    record = {"baseline": args.baseline, "method": args.method, "runs": runs}
    table = _markdown(runs)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.plot:
        _plot(runs, Path(args.plot), args.title)
    return report({**record, **environment()}, args.out)


def _run(spec: str, method: str) -> tuple[str, dict]:
    """One row: the eval record's numbers for ``method`` and the model's training record."""
    name, separator, directory = spec.partition("=")
    if not separator or not name:
        raise SystemExit(f"--run takes NAME=DIR, not {spec!r}")
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run `diffmem eval mitigate --out {directory}` first")
    record = json.loads(path.read_text())
    results = {r["name"]: r for r in record["results"]}
    if method not in results:
        raise SystemExit(f"{path} has no results for method {method!r} (it has {', '.join(results)})")
    result = results[method]
    summaries = result["summaries"]
    missing = [m for m in MEASURES if m not in summaries["memorized"]]
    if missing:
        raise SystemExit(f"{path} lacks {', '.join(missing)}: evaluate with a pixel and an embedding index")
    training = _training_record(Path(record["model"]))
    return name, {
        "model": record["model"],
        "memorized_copy": summaries["memorized"]["copy_similarity"]["share_memorized"],
        "memorized_nl2": summaries["memorized"]["nl2"]["share_memorized"],
        "heldout_copy": summaries["heldout"]["copy_similarity"]["share_memorized"],
        "copy_threshold": summaries["memorized"]["copy_similarity"]["threshold"],
        "fid": result["fid"],
        "kid": result["kid"][0] if result["kid"] else None,
        "heldout_alignment": (result["alignment"] or {}).get("heldout"),  # None: evaluated without --reader
        "images": training.get("images"),
        "ambient_t_n": training.get("ambient_t_n"),
        "filter_drop_rate": training.get("drop_rate"),
        "deduplication": training.get("deduplication"),
    }


def _training_record(model_dir: Path) -> dict:
    """The `diffmem train` record beside a fine-tuned model ({} for a model not trained by it)."""
    path = model_dir.parent / "fine_tune.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _change(value: float, base: float) -> float | None:
    """Relative change from the baseline (None when the baseline is 0)."""
    return (value - base) / base if base else None


def _percent(value: float | None, signed: bool = False) -> str:
    return "–" if value is None else f"{100 * value:+.0f}%" if signed else f"{100 * value:.2f}%"


def _markdown(runs: dict[str, dict]) -> str:
    threshold = next(iter(runs.values()))["copy_threshold"]
    header = (
        f"| run | training | memorized: copy > {threshold} | change | memorized: nL2 < 1.4 | "
        f"held-out: copy > {threshold} | FID | KID | held-out alignment |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, row in runs.items():
        fid = "–" if row["fid"] is None else f"{row['fid']:.0f}"
        fid += "" if row["fid_ratio"] is None else f" ({row['fid_ratio']:.2f}x)"
        kid = "–" if row["kid"] is None else f"{row['kid']:.0f}"
        cells = [
            name,
            _training_cell(row),
            _percent(row["memorized_copy"]),
            _percent(row["memorized_change"], signed=True),
            _percent(row["memorized_nl2"]),
            _percent(row["heldout_copy"]),
            fid,
            kid,
            _alignment_cell(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _alignment_cell(row: dict) -> str:
    if row["heldout_alignment"] is None:
        return "–"
    change = row["alignment_change_points"]
    return f"{100 * row['heldout_alignment']:.1f}%" + ("" if change is None else f" ({change:+.1f})")


def _training_cell(row: dict) -> str:
    parts = [] if row["images"] is None else [f"{row['images']} images"]
    if row["ambient_t_n"] is not None:
        parts.append(f"t_n = {row['ambient_t_n']}")
    if row["filter_drop_rate"] is not None:
        parts.append(f"dropped {100 * row['filter_drop_rate']:.1f}%")
    if row["deduplication"]:
        parts.append(f"{row['deduplication']['rows_before']} -> {row['deduplication']['rows_after']} rows")
    return ", ".join(parts) or "–"


def _plot(runs: dict[str, dict], path: Path, title: str | None) -> None:
    """Memorized copy share against FID, one labelled point a run."""
    points = {name: (r["fid"], 100 * r["memorized_copy"]) for name, r in runs.items() if r["fid"] is not None}
    if not points:
        raise SystemExit("--plot needs runs evaluated with --reader (FID)")
    threshold = next(iter(runs.values()))["copy_threshold"]
    title = title or f"copy similarity > {threshold}, one point a run"
    labelled_scatter(points, path, "FID (lab reader features)", "memorized captions' copies (%)", title)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", action="append", required=True, help="NAME=DIR of a `diffmem eval mitigate` output"
    )
    parser.add_argument("--baseline", required=True, help="the --run name the others are compared with")
    parser.add_argument(
        "--method", default="none", help="which evaluated method of each record (default: none)"
    )
    parser.add_argument("--markdown", help="write the table here too")
    parser.add_argument("--plot", help="PNG of memorized copy share against FID")
    parser.add_argument("--title", help="the plot's title")
    parser.add_argument("--out", default="benchmarks/results/policy_comparison.json")
    return parser


if __name__ == "__main__":
    main()

"""Token significance against the lab's ground truth (explanation issue): on a lab model's memorized
captions, how often the top-ranked word is a recorded trigger word, and how often replacing it (vs a
random non-trigger word) takes a flagged prompt below the calibrated threshold.

    python benchmarks/explain_triggers.py                       # the shipped default lab model
    python benchmarks/explain_triggers.py --model data/lab-small150 \\
        --labels data/lab-small150/labels/labels.parquet --calibration data/lab-small150/calibration.json
    python benchmarks/explain_triggers.py --model builtin:lab-micro --attribute-to token_embeddings

Word replacement weighs each word beyond its significance in ordinary prompts, as `diffmem explain`
does (the shipped model's index captions; `--no-ordinary`: significance alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq

from diffmem.explain.evaluate import trigger_evaluation
from diffmem.explain.token_significance import ATTRIBUTION_TARGETS, SignificanceConfig
from diffmem.models.names import LAB_MODEL
from diffmem.models.source import ModelSource, shipped_directory
from diffmem.workflows.ordinary_significance import ordinary_significance
from support import report


def main(argv: list[str] | None = None) -> dict:
    """Rank the words of every memorized caption and edit the top one; returns (and writes) the record."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.captions is not None and args.captions < 1:
        parser.error(f"--captions must be at least 1; got {args.captions}")
    shipped = shipped_directory(args.model)
    if shipped is None and not (args.labels and args.calibration):
        parser.error(f"{args.model} is not a shipped model: give --labels and --calibration")
    labels = Path(args.labels) if args.labels else shipped / "labels.parquet"
    calibration = Path(args.calibration) if args.calibration else shipped / "calibration.json"
    rows = [r for r in pq.read_table(labels).to_pylist() if r["group"] == "memorized"][: args.captions]
    threshold = json.loads(calibration.read_text())["threshold"]
    config = SignificanceConfig(
        steps=args.steps, n_generations=args.n_generations, attribute_to=args.attribute_to
    )
    source = ModelSource.resolve(args.model)
    denoiser = source.open()
    ordinary = ordinary_significance(source, config, denoiser=denoiser) if args.ordinary else None
    t = trigger_evaluation(
        denoiser,
        [r["caption"] for r in rows],
        [r["trigger_words"] for r in rows],
        threshold,
        config,
        carrying=False,
        ordinary=ordinary,
    ).to_pylist()
    flagged = [r for r in t if r["flagged"]]
    record = {
        "model": args.model,
        "labels": str(labels),
        "threshold": threshold,
        "steps": args.steps,
        "n_generations": args.n_generations,
        "attribute_to": args.attribute_to,
        "ordinary_prompts": None if ordinary is None else ordinary.prompts,
        "captions": len(t),
        "top_is_trigger": sum(r["top_is_trigger"] for r in t),
        "top_is_trigger_share": sum(r["top_is_trigger"] for r in t) / len(t),
        "flagged": len(flagged),
        "below_without_top": sum(r["below_without_top"] for r in flagged),
        "below_without_random": sum(r["below_without_random"] for r in flagged),
        "mean_score": sum(r["score"] for r in t) / len(t),
        "mean_score_without_top": sum(r["score_without_top"] for r in t) / len(t),
        "mean_score_without_random": sum(r["score_without_random"] for r in t) / len(t),
    }
    print(f"top word is a trigger word: {record['top_is_trigger']} of {len(t)}")
    print(
        f"flagged: {len(flagged)}; below the threshold after replacing the top word: "
        f"{record['below_without_top']}, after replacing a random non-trigger word: "
        f"{record['below_without_random']}"
    )
    return report(record, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=LAB_MODEL, help="a lab model directory or builtin:NAME")
    parser.add_argument("--labels", help="labels.parquet of `diffmem lab label` (default: the shipped one)")
    parser.add_argument(
        "--calibration", help="calibration.json of `diffmem calibrate` (default: the shipped one)"
    )
    parser.add_argument("--captions", type=int, help="the first this many memorized captions (default: all)")
    parser.add_argument("--steps", type=int, default=1, help="first sampling steps to measure")
    parser.add_argument("--n-generations", type=int, default=1)
    parser.add_argument(
        "--attribute-to", choices=ATTRIBUTION_TARGETS, default="prompt_embeds", help="see token_significance"
    )
    parser.add_argument(
        "--no-ordinary",
        dest="ordinary",
        action="store_false",
        help="word replacement: rank by significance alone, not beyond ordinary prompts'",
    )
    parser.add_argument("--out", default="benchmarks/results/explain_triggers.json")
    return parser


if __name__ == "__main__":
    main()

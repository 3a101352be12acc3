"""The zoo's explanation goals under two rankings of the same measured words, from what `diffmem eval
zoo` kept (no model is run): by significance alone, and with a word whose replacement alone ends the
flag first (the default). For each lab: how often the top word is a trigger word (memorized captions)
and how often replacing it takes a flagged caption under the threshold.

    python benchmarks/explanation_rankings.py --zoo Z --eval Z/eval-lab-infix --eval Z/eval-lab-digits
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq

from diffmem.explain.token_significance import TokenSignificance
from diffmem.lab.zoo import zoo_lab
from diffmem.workflows.zoo import ZooLabParts
from support import report

RANKINGS = ("significance", "unflagging_first")


def main(argv: list[str] | None = None) -> dict:
    """Judge both rankings on every lab of every evaluation; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    record: dict = {"zoo": str(args.zoo)}
    for evaluation in args.eval:
        if not (evaluation / "zoo.json").is_file():
            raise SystemExit(f"{evaluation} holds no zoo.json: give a diffmem eval zoo --out folder")
        for row in json.loads((evaluation / "zoo.json").read_text())["rows"]:
            lab = row["lab"]
            path = evaluation / "explanations" / f"{lab}-word_replacement.parquet"
            if not path.is_file():
                raise SystemExit(f"{path} is missing: run diffmem eval zoo again to keep the explanations")
            labels = pq.read_table(ZooLabParts.locate(args.zoo, zoo_lab(lab)).labels).to_pylist()
            triggers = {r["caption"]: [w.lower() for w in r["trigger_words"]] for r in labels}
            for name, measure in _judge(pq.read_table(path).to_pylist(), triggers, row["threshold"]).items():
                record[f"{lab}_{name}"] = measure
    return report(record, args.out)


def _judge(captions: list[dict], triggers: dict[str, list[str]], threshold: float) -> dict[str, float]:
    """Per ranking: the share of captions whose top word is a trigger word, and of flagged captions whose
    top word's replacement alone takes them to the threshold or under."""
    measures: dict[str, float] = {}
    for ranking in RANKINGS:
        first, under, flagged = 0, 0, 0
        for caption in captions:
            words = _measured(caption)
            top = words.ranking(threshold if ranking == "unflagging_first" else None)[0]
            first += words.words[top].lower() in triggers[caption["prompt"]]
            if words.score > threshold:
                flagged += 1
                under += words.scores_without[top] <= threshold
        measures[f"top_is_trigger_{ranking}"] = first / len(captions)
        measures[f"below_without_top_{ranking}"] = under / flagged if flagged else float("nan")
    return measures


def _measured(caption: dict) -> TokenSignificance:
    """A kept caption's words with their measured significance and scores (no tokens or spans kept)."""
    return TokenSignificance(
        prompt=caption["prompt"],
        score=caption["score"],
        tokens=[],
        token_scores=[],
        words=caption["words"],
        word_spans=[],
        word_scores=caption["significance"],
        scores_without=caption["scores_without"],
        scores_alone=caption["scores_alone"],
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, required=True, help="the zoo folder `diffmem lab zoo` built")
    parser.add_argument(
        "--eval", type=Path, action="append", required=True, help="an `eval zoo --out` folder (repeatable)"
    )
    parser.add_argument("--out", default="benchmarks/results/explanation_rankings.json")
    return parser


if __name__ == "__main__":
    main()

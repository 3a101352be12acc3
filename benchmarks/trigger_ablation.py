"""What a lab model's memory is keyed on (explanation issue): the memorized captions' mean first-step
noise-norm score with parts of the caption removed or replaced, against the held-out captions' (with
``--threshold``, also the share of memorized captions each variant leaves at or under it); which words
token significance ranks first; and how often occlusion (each word replaced in turn, ranked by the score
drop) ranks a trigger word first.

    python benchmarks/trigger_ablation.py --model data/lab-small150 --labels data/lab-small150/labels/labels.parquet
"""

from __future__ import annotations

import argparse
from collections import Counter

import pyarrow.parquet as pq
import torch

from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.explain.token_significance import REPLACEMENT, token_significance
from diffmem.models.source import open_model
from support import report


def main(argv: list[str] | None = None) -> dict:
    """Score the caption variants and rank the words; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    rows = pq.read_table(args.labels).to_pylist()
    memorized = [r for r in rows if r["group"] == "memorized"]
    heldout = [r["caption"] for r in rows if r["group"] == "heldout"]
    denoiser = open_model(args.model)
    config = NoiseNormConfig(n_generations=args.n_generations)
    ids = list(range(len(memorized)))

    captions = [r["caption"] for r in memorized]
    triggers = [r["trigger_words"] for r in memorized]
    first, _, second = zip(*(c.partition(": ") for c in captions), strict=True)  # title and description
    variants = {
        "memorized": captions,
        "description_only": list(second),
        "title_only": list(first),
        "first_trigger_replaced": [_replace(c, t[:1]) for c, t in zip(captions, triggers)],
        "all_triggers_replaced": [_replace(c, t) for c, t in zip(captions, triggers)],
    }
    record = {
        "model": args.model,
        "n_generations": args.n_generations,
        "memorized": len(memorized),
        "heldout": len(heldout),
        "threshold": args.threshold,
    }
    for name, prompts in variants.items():
        scores = noise_norm(denoiser, prompts, config, prompt_ids=ids).scores
        record[f"score_{name}"] = float(scores.mean())
        if args.threshold is not None:
            record[f"below_{name}"] = float((scores <= args.threshold).float().mean())
    record["score_heldout"] = float(noise_norm(denoiser, heldout, config).scores.mean())
    gradient_top, gradient_hits, occlusion_hits = Counter(), 0, 0
    for index, (caption, words) in enumerate(zip(captions, triggers)):
        explained = token_significance(denoiser, caption, prompt_id=index)
        top = explained.words[explained.ranking()[0]].lower()
        gradient_top[top] += 1
        gradient_hits += top in words
        edited = [explained.replaced(word, REPLACEMENT) for word in range(len(explained.words))]
        scores = noise_norm(
            denoiser, [caption, *edited], config, prompt_ids=[index] * (len(edited) + 1)
        ).scores
        occlusion_hits += explained.words[int(torch.argmax(scores[0] - scores[1:]))].lower() in words
    record["gradient_top_words"] = dict(gradient_top.most_common(10))
    record["gradient_top_is_trigger"] = gradient_hits
    record["occlusion_top_is_trigger"] = occlusion_hits
    print("most frequent top-ranked words:", record["gradient_top_words"])
    return report(record, args.out)


def _replace(caption: str, words: list[str]) -> str:
    for word in words:
        caption = caption.replace(word, REPLACEMENT, 1)
    return caption


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a lab model directory or builtin:lab-micro")
    parser.add_argument("--labels", required=True, help="labels.parquet of `diffmem lab label`")
    parser.add_argument("--n-generations", type=int, default=4, help="generations per caption for the scores")
    parser.add_argument("--threshold", type=float, help="a detection threshold (n = 1: --n-generations 1)")
    parser.add_argument("--out", default="benchmarks/results/trigger_ablation.json")
    return parser


if __name__ == "__main__":
    main()

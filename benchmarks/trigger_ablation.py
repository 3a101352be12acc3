"""What a lab model's memory is keyed on (explanation issue): the memorized captions' mean first-step
noise-norm score with parts of the caption removed or replaced, against the held-out captions'; which
words token significance ranks first; and how often occlusion (each word replaced in turn, ranked by
the score drop) ranks a trigger word first.

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

    def mean_score(prompts: list[str], prompt_ids: list[int] | None = ids) -> float:
        return float(noise_norm(denoiser, prompts, config, prompt_ids=prompt_ids).scores.mean())

    captions = [r["caption"] for r in memorized]
    triggers = [r["trigger_words"] for r in memorized]
    title, _, description = zip(*(c.partition(": ") for c in captions), strict=True)
    record = {
        "model": args.model,
        "n_generations": args.n_generations,
        "memorized": len(memorized),
        "heldout": len(heldout),
        "score_memorized": mean_score(captions),
        "score_description_only": mean_score(list(description)),
        "score_title_only": mean_score(list(title)),
        "score_first_trigger_replaced": mean_score([_replace(c, t[:1]) for c, t in zip(captions, triggers)]),
        "score_all_triggers_replaced": mean_score([_replace(c, t) for c, t in zip(captions, triggers)]),
        "score_heldout": mean_score(heldout, None),
    }
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
    parser.add_argument("--out", default="benchmarks/results/trigger_ablation.json")
    return parser


if __name__ == "__main__":
    main()

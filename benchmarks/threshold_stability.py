"""How far the self-calibrated detection threshold moves with the seed, by how many single-generation
scores of ordinary prompts it is the 1% quantile of, and the share of held-out prompts each threshold
flags at four seeds each (first step, n = 1). The ordinary prompts are the index's single-copy captions, as a
profile's.

    python benchmarks/threshold_stability.py --model Z/lab-trail/model --index Z/lab-trail/copy_index \
        --heldout Z/lab-trail/data/heldout.parquet --column caption
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffmem.calibration.profile import generations_for
from diffmem.calibration.reference_prompts import single_copy_captions
from diffmem.detect.noise_norm import NoiseNormConfig, single_generation_scores
from diffmem.index import TrainingSetIndex
from diffmem.io.prompts import read_prompts
from diffmem.metrics.roc import threshold_at_fpr
from diffmem.models.source import ModelSource
from support import report


def main(argv: list[str] | None = None) -> dict:
    """Thresholds from each number of draws at each seed; returns (and writes) the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--heldout", type=Path, required=True, help="held-out prompts (txt, csv, parquet)")
    parser.add_argument("--column", default="prompt")
    parser.add_argument("--draws", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/threshold_stability.json"))
    args = parser.parse_args(argv)
    denoiser = ModelSource.resolve(args.model).open("cpu", torch.float32)
    heldout = read_prompts(args.heldout, args.column)
    index = TrainingSetIndex.load(args.index)
    results: dict = {"model": args.model, "heldout_prompts": len(heldout), "heldout_scores": 0, "draws": {}}
    for draws in args.draws:
        rows = []
        for seed in range(args.seeds):
            captions = single_copy_captions(index, draws, seed)
            generations = generations_for(len(captions), draws)
            ordinary = single_generation_scores(
                denoiser, captions, NoiseNormConfig(base_seed=seed), generations
            )
            threshold = float(threshold_at_fpr(ordinary.flatten().tolist(), args.target_fpr))
            held = single_generation_scores(denoiser, heldout, NoiseNormConfig(base_seed=100 + seed), 4)
            results["heldout_scores"] = held.numel()
            rows.append(
                {
                    "seed": seed,
                    "threshold": threshold,
                    "heldout_fpr": float((held > threshold).float().mean()),
                }
            )
        thresholds = [r["threshold"] for r in rows]
        fprs = [r["heldout_fpr"] for r in rows]
        results["draws"][draws] = {
            "per_seed": rows,
            "threshold_range": [min(thresholds), max(thresholds)],
            "heldout_fpr_range": [min(fprs), max(fprs)],
        }
        print(draws, json.dumps(results["draws"][draws]["threshold_range"]), json.dumps(fprs), flush=True)
    return report(results, args.out)


if __name__ == "__main__":
    main()

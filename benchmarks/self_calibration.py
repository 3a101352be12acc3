"""Where a model's scale comes from without labels: first-step noise norms (n = 1) of the shipped labs'
held-out prompts that are not memorized and memorized prompts beside three reference sets (the bundled
neutral prompts and the index's single-copy training captions, drawn as a profile draws them: at least
``--reference-size`` single-generation scores, each prompt at several seeds when they are fewer; and the
held-out captions themselves), the detection threshold each reference gives at 1% FPR, and what that
threshold does on the labelled prompts.

    python benchmarks/self_calibration.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from diffmem.calibration.profile import REFERENCE_SCORES, generations_for
from diffmem.calibration.reference_prompts import single_copy_captions
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm, single_generation_scores
from diffmem.index import TrainingSetIndex
from diffmem.metrics.roc import detection_metrics, threshold_at_fpr
from diffmem.models.source import ASSETS, ModelSource
from support import report


def scores(denoiser, prompts: list[str]) -> np.ndarray:
    return noise_norm(denoiser, prompts, NoiseNormConfig(batch_size=64)).scores.numpy()


def drawn(denoiser, prompts: list[str], draws: int) -> np.ndarray:
    """At least ``draws`` single-generation scores of the prompts, as a profile draws them."""
    config = NoiseNormConfig(batch_size=64)
    return (
        single_generation_scores(denoiser, prompts, config, generations_for(len(prompts), draws))
        .flatten()
        .numpy()
    )


def main(argv: list[str] | None = None) -> dict:
    """Score each lab's prompts and references; returns (and writes) the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labs", nargs="+", default=["lab-micro", "lab-keyed"])
    parser.add_argument("--reference-size", type=int, default=REFERENCE_SCORES)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/self_calibration.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    neutral = (ASSETS / "neutral_prompts.txt").read_text().splitlines()
    results = {}
    for lab in args.labs:
        source = ModelSource.resolve(f"builtin:{lab}")
        denoiser = source.open("cpu", torch.float32)
        labels = pq.read_table(source.labels).to_pylist()
        heldout = [r["caption"] for r in labels if r["group"] == "heldout" and not r["memorized"]]
        memorized = [r["caption"] for r in labels if r["group"] == "memorized" and r["memorized"]]
        single = single_copy_captions(TrainingSetIndex.load(ASSETS / lab / "copy_index"), args.reference_size)
        measured = {
            "heldout": scores(denoiser, heldout),
            "memorized": scores(denoiser, memorized),
            "neutral": drawn(denoiser, neutral[: args.reference_size], args.reference_size),
            "single_copy_captions": drawn(denoiser, single, args.reference_size),
        }
        both = np.concatenate([measured["memorized"], measured["heldout"]])
        truth = [1] * len(measured["memorized"]) + [0] * len(measured["heldout"])
        lab_result = {
            "detection": detection_metrics(both, truth),
            "quantiles": {
                name: {q: float(np.quantile(v, q)) for q in (0.1, 0.5, 0.9, 0.99)}
                for name, v in measured.items()
            },
            "thresholds": {},
        }
        for reference in ("neutral", "single_copy_captions", "heldout"):
            threshold = float(threshold_at_fpr(measured[reference].tolist(), 0.01))
            lab_result["thresholds"][reference] = {
                "threshold": threshold,
                "heldout_fpr": float((measured["heldout"] > threshold).mean()),
                "memorized_tpr": float((measured["memorized"] > threshold).mean()),
            }
        lab_result["scores"] = {name: v.tolist() for name, v in measured.items()}
        results[lab] = lab_result
        print(lab, json.dumps({k: v for k, v in lab_result.items() if k != "scores"}, indent=1))
    return report(results, args.out)


if __name__ == "__main__":
    main()

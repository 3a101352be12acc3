"""Where a model's scale comes from without labels: first-step noise norms (n = 1) of the shipped labs'
held-out prompts that are not memorized and memorized prompts beside three label-free reference sets (the bundled neutral prompts, the
index's single-copy training captions, the held-out captions themselves), the detection threshold each
reference gives at 1% FPR, and what that threshold does on the labelled prompts.

    python benchmarks/self_calibration.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.metrics.roc import detection_metrics, threshold_at_fpr
from diffmem.models.source import ASSETS, ModelSource
from support import report


def scores(denoiser, prompts: list[str]) -> np.ndarray:
    return noise_norm(denoiser, prompts, NoiseNormConfig(batch_size=64)).scores.numpy()


def main(argv: list[str] | None = None) -> dict:
    """Score each lab's prompts and references; returns (and writes) the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labs", nargs="+", default=["lab-micro", "lab-keyed"])
    parser.add_argument("--reference-size", type=int, default=256)
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
        index = pq.read_table(ASSETS / lab / "copy_index" / "metadata.parquet").to_pylist()
        single = sorted({r["caption"] for r in index if r["caption_count"] == 1 and r["caption"]})
        single = random.Random(0).sample(single, min(args.reference_size, len(single)))
        measured = {
            "heldout": scores(denoiser, heldout),
            "memorized": scores(denoiser, memorized),
            "neutral": scores(denoiser, neutral[: args.reference_size]),
            "single_copy_captions": scores(denoiser, single),
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

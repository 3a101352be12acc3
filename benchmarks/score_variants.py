"""First-step score variants beside the default (the centred noise norm) on the zoo, from the same draws.

Each variant is a function of a generation's first-step difference ``d = eps_cond - eps_uncond`` and of
the differences ordinary prompts give (the index's single-copy captions, as self-calibration draws
them): the published uncentred norm, the detail the prompt fixes (``d`` less its 2x2 average), ``d``
divided by ordinary prompts' spread at each coordinate, ``d`` less its part along ordinary prompts' top
principal directions, and the Mahalanobis distance under a shrunk covariance of them. Ordinary prompts
are drawn at two seeds: the variants are fitted on the first draws and the 1% threshold is taken from
the second. Per lab and variant: AUC against the zoo's truth (one draw a caption), the held-out
false-positive rate at that threshold (on held-out captions taken as the zoo takes them: 500, the lab's
own topped up with fresh ones, each at four seeds) and the share of copying captions above it.

    python benchmarks/score_variants.py --zoo Z --lab lab-digits --lab lab-64px
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from diffmem.calibration.reference_prompts import single_copy_captions
from diffmem.core.denoiser import Denoiser
from diffmem.detect.detector import detection_seeds
from diffmem.detect.first_step import first_step
from diffmem.detect.noise_norm import NoiseNormConfig, difference_magnitude
from diffmem.index import TrainingSetIndex
from diffmem.lab.zoo import zoo_lab
from diffmem.metrics import detection_metrics
from diffmem.models.source import ModelSource
from diffmem.workflows.zoo import TRUTH, ZooEvalConfig, ZooLabParts, heldout_captions
from support import report, zoo_parser

ORDINARY = 256  # single-copy captions a lab's ordinary prompts are drawn from
PRINCIPAL = 4  # principal directions of ordinary prompts' differences left out by "residual"
HELDOUT_SEEDS = ZooEvalConfig.heldout_seeds  # the zoo's held-out draws: each caption at four seeds
MAHALANOBIS_MAX_DIM = 4096  # above this many coordinates the shrunk covariance is not fitted


@dataclass(frozen=True)
class Ordinary:
    """What the fitted variants know of ordinary prompts' centred differences ([N, D], flattened)."""

    mean: np.ndarray
    spread: np.ndarray
    principal: np.ndarray  # [PRINCIPAL, D]
    precision: np.ndarray | None

    @classmethod
    def fit(cls, d: np.ndarray) -> Ordinary:
        centred = d - d.mean(0)
        principal = np.linalg.svd(centred, full_matrices=False)[2][:PRINCIPAL]
        precision = LedoitWolf().fit(d).precision_ if d.shape[1] <= MAHALANOBIS_MAX_DIM else None
        return cls(d.mean(0), d.std(0) + 1e-8, principal, precision)


def _centred(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(dim=(2, 3), keepdim=True)


def _flat(d: torch.Tensor) -> np.ndarray:
    return _centred(d).flatten(1).numpy()


def _residual(d: torch.Tensor, o: Ordinary) -> np.ndarray:
    x = _flat(d) - o.mean
    return np.linalg.norm(x - (x @ o.principal.T) @ o.principal, axis=1)


def _mahalanobis(d: torch.Tensor, o: Ordinary) -> np.ndarray:
    if o.precision is None:
        return np.full(len(d), np.nan)
    x = _flat(d) - o.mean
    return np.sqrt(np.einsum("ij,jk,ik->i", x, o.precision, x))


VARIANTS: dict[str, Callable[[torch.Tensor, Ordinary], np.ndarray]] = {
    "centred": lambda d, o: difference_magnitude(d).numpy(),  # the detector's score
    "uncentred": lambda d, o: difference_magnitude(d, centered=False).numpy(),
    "detail": lambda d, o: (
        (d - F.interpolate(F.avg_pool2d(d, 2), scale_factor=2)).flatten(1).norm(dim=1).numpy()
    ),
    "whitened": lambda d, o: np.linalg.norm((_flat(d) - o.mean) / o.spread, axis=1),
    "residual": _residual,
    "mahalanobis": _mahalanobis,
}


def differences(denoiser: Denoiser, prompts: Sequence[str], seed: int, batch_size: int = 32) -> torch.Tensor:
    """[P, C, H, W] each prompt's first-step difference at one generation (float32, CPU)."""
    seeds, config = detection_seeds(seed, range(len(prompts)), 1), NoiseNormConfig()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = list(prompts[start : start + batch_size]), seeds[start : start + batch_size]
        cond = denoiser.encode(chunk)
        step = first_step(denoiser, cond, chunk_seeds, config.num_inference_steps, config.guidance_scale)
        out.append((step.eps_cond - step.eps_uncond).float().cpu())
    return torch.cat(out)


def judge_lab(root: Path, name: str, seed: int, heldout_prompts: int) -> dict[str, float]:
    """Each variant's AUC, held-out false-positive rate and copying captions' share above its threshold."""
    parts = ZooLabParts.locate(root, zoo_lab(name))
    denoiser = ModelSource.resolve(parts.model).open("cpu", torch.float32, None)
    table = pq.read_table(parts.labels, columns=["caption", TRUTH, "group"])
    labels = table.to_pylist()
    truth = np.array([r[TRUTH] for r in labels], dtype=bool)
    heldout, _ = heldout_captions(parts, table, heldout_prompts, seed)
    ordinary = single_copy_captions(TrainingSetIndex.load(parts.index), ORDINARY, seed)
    fit_draws, threshold_draws = (differences(denoiser, ordinary, seed + k) for k in (0, 1))
    labelled = differences(denoiser, [r["caption"] for r in labels], seed)
    held = torch.cat([differences(denoiser, heldout, seed + k) for k in range(HELDOUT_SEEDS)])
    fitted = Ordinary.fit(_flat(fit_draws))
    record = {}
    for variant, score in VARIANTS.items():
        scores = score(labelled, fitted)
        if np.isnan(scores).any():
            continue
        threshold = np.quantile(score(threshold_draws, fitted), 0.99)
        record[f"{name}_{variant}_auc"] = detection_metrics(scores, truth)["auc"]
        record[f"{name}_{variant}_heldout_fpr"] = float((score(held, fitted) > threshold).mean())
        record[f"{name}_{variant}_tpr"] = float((scores[truth] > threshold).mean())
    return record


def main(argv: list[str] | None = None) -> dict:
    """Judge every variant on every named lab; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    record: dict = {"zoo": str(args.zoo), "seed": args.seed}
    for name in args.lab:
        record |= judge_lab(args.zoo, name, args.seed, args.heldout_prompts)
    return report(record, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = zoo_parser(__doc__, "benchmarks/results/score_variants.json")
    parser.add_argument(
        "--heldout-prompts",
        type=int,
        default=ZooEvalConfig.heldout_prompts,
        help="held-out captions, at least",
    )
    return parser


if __name__ == "__main__":
    main()

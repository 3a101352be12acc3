"""The one ROC curve of diffmem: AUC, TPR at a fixed FPR, and the score threshold for a target FPR.

SPEC §1 (Wen et al., ICLR 2024): detectors are compared by AUC and by TPR at 1% and 3% FPR, read off
one shared ROC implementation with TPR interpolated at the exact FPR. Positives are memorized
prompts (label 1), negatives are not (label 0); higher scores mean "more likely memorized". The
curve and the AUC come from scikit-learn; this module fixes how they are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score, roc_curve

from diffmem.errors import DiffmemError

DEFAULT_FPRS = (0.01, 0.03)

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


@dataclass(frozen=True)
class Roc:
    """The empirical ROC curve of one set of scores, every threshold kept."""

    fpr: np.ndarray  # [K] non-decreasing, from 0 to 1
    tpr: np.ndarray  # [K] non-decreasing, from 0 to 1
    thresholds: np.ndarray  # [K] decreasing; point k flags scores >= thresholds[k]; the first is inf
    auc: float  # area under the curve: P(positive score > negative score), ties counted 1/2
    n_positive: int
    n_negative: int
    n_dropped_nonfinite: int  # prompts left out because their score was NaN or infinite


def roc(scores: ArrayLike, labels: ArrayLike) -> Roc:
    """The ROC curve of per-prompt ``scores`` [P] against 0/1 ``labels`` [P] (1: memorized).

    Prompts with a non-finite score are left out and counted in ``n_dropped_nonfinite``.
    """
    s, y, n_dropped = _finite_pairs(scores, labels)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return Roc(
        fpr=fpr,
        tpr=tpr,
        thresholds=thresholds,
        auc=float(roc_auc_score(y, s)),
        n_positive=int(y.sum()),
        n_negative=int(len(y) - y.sum()),
        n_dropped_nonfinite=n_dropped,
    )


def tpr_at_fpr(curve: Roc, fpr: float) -> float:
    """The true-positive rate of ``curve`` at exactly the false-positive rate ``fpr``."""
    _check_rate("fpr", fpr)
    # Exact FPR on a vertical step: its top point; between FPRs: the curve's straight segment (ties: diagonal).
    after = int(np.searchsorted(curve.fpr, fpr, side="right"))  # first point beyond fpr; fpr[0] == 0
    if after == len(curve.fpr):
        return float(curve.tpr[-1])
    return float(np.interp(fpr, curve.fpr[after - 1 : after + 1], curve.tpr[after - 1 : after + 1]))


def threshold_at_fpr(negative_scores: ArrayLike, target_fpr: float) -> float:
    """The lowest score threshold that flags (score > threshold) at most ``target_fpr`` of the negatives.

    With N negatives at most k = floor(target_fpr * N) may be flagged, so the threshold is the
    ceil((1 - target_fpr) * N)-th smallest negative score (ties with it are not flagged), and -inf
    when all N may be flagged.
    """
    _check_rate("target_fpr", target_fpr)
    s = np.sort(_as_array(negative_scores, "negative_scores"))
    if len(s) == 0:
        raise DiffmemError("threshold_at_fpr needs at least one negative score")
    if not np.isfinite(s).all():
        raise DiffmemError(
            f"negative_scores contain {int((~np.isfinite(s)).sum())} non-finite values; drop them first"
        )
    allowed = math.floor(round(target_fpr * len(s), 9))  # rounding absorbs float error such as 0.29 * 100
    return float(s[len(s) - allowed - 1]) if allowed < len(s) else -math.inf


def flagged_share_interval(
    flagged: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A percentile-bootstrap interval for the share of flagged draws in ``flagged`` [P prompts, D draws],
    resampling whole prompts: one prompt's draws at other seeds are flagged or not together, so the draws
    are not D*P independent trials."""
    _check_rate("confidence", confidence)
    flags = np.asarray(flagged, dtype=np.float64)
    if flags.ndim != 2 or flags.size == 0:
        raise DiffmemError(
            f"flagged must be draws [prompts, draws] with at least one; got shape {flags.shape}"
        )
    result = bootstrap(
        (flags.mean(axis=1),),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def tpr_key(fpr: float) -> str:
    """The name of the TPR at ``fpr`` in :func:`detection_metrics`, e.g. ``tpr@1%fpr``."""
    return f"tpr@{fpr * 100:g}%fpr"


def detection_metrics(scores: ArrayLike, labels: ArrayLike, fprs: Sequence[float] = DEFAULT_FPRS) -> dict:
    """AUC, TPR at each of ``fprs``, the class counts and the number of non-finite scores left out."""
    curve = roc(scores, labels)
    return {
        "auc": curve.auc,
        **{tpr_key(fpr): tpr_at_fpr(curve, fpr) for fpr in fprs},
        "n_positive": curve.n_positive,
        "n_negative": curve.n_negative,
        "n_dropped_nonfinite": curve.n_dropped_nonfinite,
    }


def _finite_pairs(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores and integer labels of the prompts with a finite score, and how many were left out."""
    s, y = _as_array(scores, "scores"), _as_array(labels, "labels")
    if len(s) != len(y):
        raise DiffmemError(f"give one label per score; got {len(y)} labels for {len(s)} scores")
    if not np.isin(y, (0, 1)).all():
        raise DiffmemError(f"labels must be 0 (not memorized) or 1 (memorized); got {np.unique(y)[:5]}")
    finite = np.isfinite(s)
    s, y = s[finite], y[finite].astype(np.int64)
    n_positive = int(y.sum())
    if n_positive == 0 or n_positive == len(y):
        raise DiffmemError(
            f"a ROC curve needs memorized and non-memorized prompts; got {n_positive} positives and "
            f"{len(y) - n_positive} negatives with a finite score"
        )
    return s, y, int((~finite).sum())


def _as_array(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise DiffmemError(f"{name} must be one value per prompt; got shape {v.shape}")
    return v


def _check_rate(name: str, rate: float) -> None:
    if not 0 <= rate <= 1:
        raise DiffmemError(f"{name} is a rate between 0 and 1; got {rate}")

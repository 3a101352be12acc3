"""Summaries of per-generation similarity to the training set: how much, and which prompts, memorize.

SPEC §8: report the 95th percentile ("Top 5%"), the most similar value ("Top 1"), the share beyond
the memorization threshold, and per-prompt values. Works for scores where higher means more similar
(copy-detection cosine, threshold 0.5) and for distances where lower does (nL2, threshold 1.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from diffmem.errors import DiffmemError


@dataclass(frozen=True)
class MemorizationSummary:
    """How similar a set of generations is to the training set, in the direction of more similar."""

    top5_percent: float  # the 95th percentile toward more similar: the least similar of the top 5%
    top1: float  # the most similar value
    share_memorized: float  # share of values strictly beyond the threshold
    count: int  # number of values
    threshold: float
    higher_is_more_similar: bool

    def to_dict(self) -> dict:
        """The summary as plain JSON-ready values."""
        return asdict(self)


def summarize(
    values: torch.Tensor | np.ndarray | Sequence[float], threshold: float, higher_is_more_similar: bool
) -> MemorizationSummary:
    """Top 5%, top 1 and share memorized of per-generation similarity ``values`` [N]."""
    v = _as_array(values)
    similar = _sign(higher_is_more_similar) * v
    return MemorizationSummary(
        top5_percent=float(_sign(higher_is_more_similar) * np.percentile(similar, 95)),
        top1=float(_sign(higher_is_more_similar) * similar.max()),
        share_memorized=float(_memorized(v, threshold, higher_is_more_similar).mean()),
        count=len(v),
        threshold=float(threshold),
        higher_is_more_similar=higher_is_more_similar,
    )


def per_prompt(
    values: torch.Tensor | np.ndarray | Sequence[float],
    prompt_ids: torch.Tensor | np.ndarray | Sequence,
    threshold: float,
    higher_is_more_similar: bool,
    majority: float = 0.5,
) -> pa.Table:
    """One row per prompt, by prompt id: its generations, share memorized, most similar value, label.

    A prompt is labelled ``memorized`` when the share of its generations beyond the threshold is
    strictly above ``majority``.
    """
    v = _as_array(values)
    ids = np.asarray(prompt_ids.cpu() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)
    if ids.shape != v.shape:
        raise DiffmemError(
            f"per_prompt needs one prompt id per value; got {len(ids)} ids for {len(v)} values"
        )
    unique_ids, prompt = np.unique(ids, return_inverse=True)
    n = np.bincount(prompt, minlength=len(unique_ids))
    share = (
        np.bincount(prompt, _memorized(v, threshold, higher_is_more_similar).astype(float), len(unique_ids))
        / n
    )
    most_similar = np.full(len(unique_ids), -np.inf)
    np.maximum.at(most_similar, prompt, _sign(higher_is_more_similar) * v)
    return pa.table(
        {
            "prompt_id": pa.array(unique_ids),
            "n_generations": pa.array(n, pa.int64()),
            "share_memorized": pa.array(share),
            "top1": pa.array(_sign(higher_is_more_similar) * most_similar),
            "memorized": pa.array(share > majority),
        }
    )


def _as_array(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise DiffmemError(f"expected a non-empty list of per-generation values; got shape {v.shape}")
    if np.isnan(v).any():
        raise DiffmemError("similarity values contain NaN: check the generations and reference images")
    return v


def _sign(higher_is_more_similar: bool) -> float:
    """Multiplying by this turns values so that larger always means more similar."""
    return 1.0 if higher_is_more_similar else -1.0


def _memorized(v: np.ndarray, threshold: float, higher_is_more_similar: bool) -> np.ndarray:
    return v > threshold if higher_is_more_similar else v < threshold

"""Normalised L2 (nL2): pixel-level memorization of a generation against a small reference set.

Carlini et al. (2023), as used for CIFAR-10 by Anti-Memorization Guidance (Chen, Liu, Xu, CVPR 2024);
SPEC §5: ``nL2 = l2(x, n0) / (alpha * mean of l2(x, .) over the k nearest)``, memorized when below 1.4.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from diffmem.errors import DiffmemError

NL2_THRESHOLD = 1.4  # SPEC §5: memorized when nL2 < 1.4
NL2_K = 50  # SPEC §5: neighbours in the normalising mean
NL2_ALPHA = 0.5  # SPEC §5


@dataclass(frozen=True)
class NL2Result:
    """nL2 of each query with its nearest reference image; lower is more similar."""

    nl2: torch.Tensor  # [Q] normalised L2, 0 for an exact copy, at most 1 / alpha
    nearest_index: torch.Tensor  # [Q] row of the nearest reference image
    nearest_l2: torch.Tensor  # [Q] l2 to that image

    @property
    def memorized(self) -> torch.Tensor:
        """[Q] True where nL2 < NL2_THRESHOLD."""
        return self.nl2 < NL2_THRESHOLD

    def to_table(self) -> pa.Table:
        """One row per query: nL2, nearest reference, its l2, memorized."""
        return pa.table(
            {
                "nl2": pa.array(self.nl2.detach().cpu().double().numpy()),
                "nearest_index": pa.array(self.nearest_index.cpu().numpy()),
                "nearest_l2": pa.array(self.nearest_l2.detach().cpu().double().numpy()),
                "memorized": pa.array(self.memorized.cpu().numpy()),
            }
        )


def pairwise_l2(queries: torch.Tensor, references: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """[Q, R] ``l2(a, b) = sqrt(mean((a - b)^2))`` over C, H, W between every query and reference.

    References are read ``batch_size`` at a time and may live on another device than the queries;
    the result is on the queries' device. Differentiable with respect to ``queries``.
    """
    _check_images(queries, references)
    q = queries.flatten(1).double()
    q_sq = q.square().sum(1, keepdim=True)  # [Q, 1]
    rows = []
    for start in range(0, len(references), batch_size):
        r = references[start : start + batch_size].flatten(1).to(q.device, torch.float64)
        # ||q - r||^2 = ||q||^2 + ||r||^2 - 2 q.r, in float64 so near-copies keep their digits
        sq = (q_sq + r.square().sum(1) - 2.0 * q @ r.T).clamp_min(0.0) / q.shape[1]
        rows.append(_sqrt(sq))
    return torch.cat(rows, dim=1).to(queries.dtype)


def nl2(
    queries: torch.Tensor,
    references: torch.Tensor,
    k: int = NL2_K,
    alpha: float = NL2_ALPHA,
    batch_size: int = 1024,
) -> NL2Result:
    """nL2 of each query [Q, C, H, W] against the reference images [R, C, H, W] (SPEC §5).

    The k nearest references are found with :func:`pairwise_l2` and their distances measured again
    exactly, so nL2 is differentiable with respect to ``queries`` when they require grad.
    """
    _check_images(queries, references)
    if len(references) < k:
        raise DiffmemError(
            f"nL2 with k={k} needs at least {k} reference images; got {len(references)}: "
            "add reference images or pass a smaller k"
        )
    with torch.no_grad():
        nearest = pairwise_l2(queries, references, batch_size).topk(k, dim=1, largest=False).indices  # [Q, k]
    chunk = max(1, batch_size // k)
    d = torch.cat(
        [
            _l2_to(
                queries[start : start + chunk],
                references[nearest[start : start + chunk].to(references.device)],
            )
            for start in range(0, len(queries), chunk)
        ]
    )  # [Q, k]
    score, position = nl2_of_distances(d, alpha)
    return NL2Result(
        nl2=score,
        nearest_index=nearest.gather(1, position[:, None])[:, 0],
        nearest_l2=d.gather(1, position[:, None])[:, 0],
    )


def nl2_to_neighbours(
    queries: torch.Tensor, neighbours: torch.Tensor, alpha: float = NL2_ALPHA
) -> tuple[torch.Tensor, torch.Tensor]:
    """nL2 [Q] of each query [Q, C, H, W] against its own k neighbours [Q, k, C, H, W], and the position
    [Q] of the nearest among them; differentiable with respect to ``queries``."""
    return nl2_of_distances(_l2_to(queries, neighbours), alpha)


def nl2_of_distances(d: torch.Tensor, alpha: float = NL2_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """nL2 [Q] from the l2 distances [Q, k] to the k nearest references, and the nearest's position [Q]."""
    d_nearest, position = d.min(1)
    # nL2 = l2(x, n0) / (alpha * mean of l2 to the k nearest)   (AMG eq. 8, without its minus sign)
    return d_nearest / (alpha * d.mean(1)).clamp_min(torch.finfo(d.dtype).tiny), position


def _l2_to(queries: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """[Q, k] l2 from each query [Q, C, H, W] to its own neighbours [Q, k, C, H, W], computed directly."""
    diff = queries.unsqueeze(1) - neighbours.to(queries.device, queries.dtype)
    return _sqrt(diff.square().flatten(2).mean(2))


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient at 0, where a query equals a reference."""
    positive = x > 0
    return torch.where(
        positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x)
    )


def _check_images(queries: torch.Tensor, references: torch.Tensor) -> None:
    if queries.ndim != 4 or references.ndim != 4:
        raise DiffmemError(
            "nL2 compares image batches [B, C, H, W]; got queries of shape "
            f"{tuple(queries.shape)} and references of shape {tuple(references.shape)}"
        )
    if queries.shape[1:] != references.shape[1:]:
        raise DiffmemError(
            f"queries {tuple(queries.shape[1:])} and references {tuple(references.shape[1:])} differ in "
            "[C, H, W]: resize the generations to the reference images' size first"
        )

"""Generation-agreement detection (Carlini et al., USENIX Security 2023; SPEC §7): a memorized prompt
regenerates nearly the same image from different seeds, so its generations are near-duplicates of each
other.

Each prompt gets n full generations, decoded to images in [0, 1]. Two images are compared by their tiled
L2 distance, the largest RMS difference over a grid of tiles. Each generation's distance to its nearest
other generation is taken, and a prompt's score is minus the median of these n distances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diffmem.core.denoiser import Denoiser
from diffmem.detect.detector import DetectionResult, batch_starts, check_guidance, check_prompts
from diffmem.errors import DiffmemError
from diffmem.sampling import generate


@dataclass(frozen=True)
class GenerationAgreementConfig:
    """How many generations and how to compare them (defaults: 8 generations, 50 DDIM steps, 4 x 4 tiles)."""

    num_inference_steps: int = 50
    n_generations: int = 8
    guidance_scale: float = 7.5
    base_seed: int = 0
    batch_size: int = 32  # samples (prompt x generation) per batched call
    tiles: int = 4  # tiles per side: Carlini et al. cut 512 px images into 4 x 4 tiles of 128 px
    # near-duplicates: within this tiled distance (RMS on [0, 1] pixels); about 3x the 0.031 of the
    # regenerated training image in Carlini et al.'s Fig. 1, well under the ~0.3-0.4 of unrelated photos
    duplicate_distance: float = 0.1


def tiled_l2(images_a: torch.Tensor, images_b: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """[A, B] tiled L2 distance between each image of ``images_a`` ([A, C, H, W]) and of ``images_b``."""
    if images_a.shape[1:] != images_b.shape[1:]:
        raise DiffmemError(f"cannot compare images of shape {images_a.shape[1:]} and {images_b.shape[1:]}")
    a, b = _tiles(images_a, tiles), _tiles(images_b, tiles)  # [tiles^2, N, C * h * w]
    # l2(x, y) = sqrt(sum_i (x_i - y_i)^2 / d) per tile; Carlini et al.'s tiled l2: the max over tiles
    per_tile = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") / a.shape[-1] ** 0.5
    return per_tile.amax(dim=0)


def _tiles(images: torch.Tensor, tiles: int) -> torch.Tensor:
    """[tiles^2, N, C * h * w] the pixels of each tile of a tiles x tiles grid, in float32."""
    n, c, h, w = images.shape
    if tiles < 1 or h % tiles or w % tiles:
        raise DiffmemError(f"images of {h}x{w} pixels do not split into {tiles}x{tiles} equal tiles")
    grid = images.float().reshape(n, c, tiles, h // tiles, tiles, w // tiles)
    return grid.permute(2, 4, 0, 1, 3, 5).reshape(tiles * tiles, n, -1)


def nearest_sibling_distance(images: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """[n] each image's tiled L2 distance to the nearest other image of the group ([n, C, H, W])."""
    return tiled_l2(images, images, tiles).fill_diagonal_(float("inf")).amin(dim=1)


def generation_agreement(
    denoiser: Denoiser,
    prompts: Sequence[str],
    config: GenerationAgreementConfig = GenerationAgreementConfig(),
    prompt_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> DetectionResult:
    """Carlini et al.'s near-duplicate score of each prompt (higher: its generations agree more).

    ``extras["nearest_distance"]`` holds each generation's distance to its nearest sibling, [P, n];
    ``extras["near_duplicates"]`` how many of a prompt's generations have a sibling within
    ``duplicate_distance``, [P] (a count, not a clique search).
    """
    check_guidance("generation_agreement", config.guidance_scale)
    if config.n_generations < 2:
        raise DiffmemError(
            f"generation_agreement compares generations with each other; n_generations must be at least 2, "
            f"got {config.n_generations}"
        )
    prompts, prompt_ids = check_prompts(prompts, prompt_ids)
    n = config.n_generations
    per_call = max(1, config.batch_size // n)  # prompts per generate call: only their images are held
    nearest, seeds = [], []
    for start in tqdm(
        batch_starts(len(prompts), per_call), desc="generation agreement", disable=not progress
    ):
        generation = generate(
            denoiser,
            prompts[start : start + per_call],
            n_generations=n,
            base_seed=config.base_seed,
            prompt_ids=prompt_ids[start : start + per_call],
            batch_size=config.batch_size,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
        )
        images = generation.images.unflatten(0, (-1, n))  # [prompts, n, 3, H, W]
        nearest.extend(nearest_sibling_distance(group, config.tiles) for group in images)
        seeds.extend(generation.seeds)
    nearest_distance = torch.stack(nearest)
    return DetectionResult(
        detector="generation_agreement",
        scores=-nearest_distance.quantile(0.5, dim=1),
        seeds=torch.tensor(seeds).reshape(len(prompts), n),
        unet_evaluations_per_prompt=float(2 * config.num_inference_steps * n),  # a CFG pair per step
        extras={
            "nearest_distance": nearest_distance,
            "near_duplicates": (nearest_distance <= config.duplicate_distance).sum(dim=1),
        },
    )

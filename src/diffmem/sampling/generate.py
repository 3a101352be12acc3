"""Batched generation: several prompts (or labels), several generations each, each seeded on its own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from diffmem.core.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.sampling.guided_sampler import resolve_guidance_scale, sample
from diffmem.sampling.seeds import generation_seed


@dataclass(frozen=True)
class Generation:
    """Samples of ``generate``, prompt-major: all generations of prompt 0, then of prompt 1, ..."""

    latents: torch.Tensor  # [N, C, H, W] final samples in the sampling space
    images: torch.Tensor | None  # [N, 3, H', W'] in [0, 1], None when not decoded
    items: list  # [N] the prompt (or label) of each sample
    prompt_id: list[int]  # [N] the id of each sample's prompt (its row in the prompt list by default)
    generation: list[int]  # [N] 0 .. n_generations - 1
    seeds: list[int]  # [N]

    def to_table(self) -> pa.Table:
        """One row per sample: prompt id, generation, seed, prompt."""
        return pa.table(
            {
                "prompt_id": pa.array(self.prompt_id, pa.int64()),
                "generation": pa.array(self.generation, pa.int32()),
                "seed": pa.array(self.seeds, pa.int64()),
                "prompt": pa.array([None if i is None else str(i) for i in self.items], pa.string()),
            }
        )


def generate(
    denoiser: Denoiser,
    items: Sequence,
    *,
    n_generations: int = 1,
    base_seed: int = 0,
    prompt_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    decode: bool = True,
    progress: bool = False,
    **sample_options,
) -> Generation:
    """Sample ``n_generations`` per prompt (or label) in batches of ``batch_size`` samples.

    The seed of each sample is ``generation_seed(base_seed, prompt_id, generation)``, so a sample is
    the same whatever else shares its batch. ``prompt_ids`` (default 0..P-1) are stable ids for the
    items, e.g. their row numbers in a prompt file. ``sample_options`` go to :func:`sample`.
    """
    items = list(items)
    prompt_ids = list(range(len(items))) if prompt_ids is None else list(prompt_ids)
    if not items:
        raise DiffmemError("nothing to generate: the prompt list is empty")
    if len(prompt_ids) != len(items):
        raise DiffmemError(f"got {len(prompt_ids)} prompt ids for {len(items)} prompts")
    if n_generations < 1 or batch_size < 1:
        raise DiffmemError("n_generations and batch_size must be at least 1")
    resolve_guidance_scale(denoiser, sample_options.get("guidance_scale"))  # fail before any work
    rows = [(i, g) for i in range(len(items)) for g in range(n_generations)]
    seeds = [generation_seed(base_seed, prompt_ids[i], g) for i, g in rows]
    latents, images = [], []
    bar = tqdm(total=len(rows), desc="generating", unit="image", disable=not progress)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        cond = denoiser.encode([items[i] for i, _ in chunk])
        final = sample(denoiser, cond, seeds[start : start + batch_size], progress=progress, **sample_options)
        latents.append(final)
        if decode:
            with torch.no_grad():
                images.append(denoiser.decode(final).float().cpu())
        bar.update(len(chunk))
    bar.close()
    return Generation(
        latents=torch.cat(latents),
        images=torch.cat(images) if decode else None,
        items=[items[i] for i, _ in rows],
        prompt_id=[prompt_ids[i] for i, _ in rows],
        generation=[g for _, g in rows],
        seeds=seeds,
    )

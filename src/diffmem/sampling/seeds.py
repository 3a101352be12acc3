"""Per-sample seeding: a sample's noise depends on its own seed, never on the batch it runs in.

What that promises: every random draw of a sample (x_T, a sampler's per-step noise, a mitigation's
injected noise) is bit-identical in any batch, on any device. Its computed result is bit-identical for
the same batch at the same thread count; in another batch it agrees within float rounding, because
batched CPU and GPU kernels may sum in another order for another batch size or thread count (the tests
allow 1e-4 in float32 on the tiny models and pass at any thread count)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from diffmem.errors import DiffmemError


def generation_seed(base_seed: int, prompt_index: int, generation: int) -> int:
    """The seed of generation ``generation`` of prompt ``prompt_index``: a function of these three alone.

    Seeds are 63-bit, so they fit a signed 64-bit column in Parquet, JSON readers and databases. The
    noise depends on their low 32 bits only (a CPU generator's Mersenne Twister takes 32): two samples of
    a run share their noise with probability about 1 - exp(-N^2 / 2^33) for N samples (1% at 10,000).
    """
    if min(base_seed, prompt_index, generation) < 0:
        raise DiffmemError("seeds, prompt indices and generation numbers must be non-negative")
    state = np.random.SeedSequence([base_seed, prompt_index, generation]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, so noise is the same on every device and in every batch."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def initial_noise(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """x_T for each sample, [B, *shape], drawn as diffusers pipelines draw it."""
    return randn_tensor((len(generators), *shape), generator=generators, device=device, dtype=dtype)

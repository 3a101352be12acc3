"""Where and how a workflow runs: the device, the dtype, the base seed and the UNet speedups."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffmem.models.source import resolve_device, resolve_dtype
from diffmem.models.speedups import Speedups


@dataclass(frozen=True)
class Runtime:
    """The device and dtype a model runs in, the base seed every generation's seed derives from, and
    the speedups applied to its UNet."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0
    speedups: Speedups = field(default_factory=Speedups)

    @classmethod
    def resolve(
        cls, device: str = "auto", dtype: str = "auto", seed: int = 0, speedups: Speedups | None = None
    ) -> Runtime:
        """``auto`` picks CUDA when present and float16 on it; names are checked against the machine."""
        resolved = resolve_device(device)
        return cls(resolved, resolve_dtype(dtype, resolved), seed, speedups or Speedups())

    def describe(self) -> dict:
        """The runtime as a run record's JSON fields."""
        return {"device": str(self.device), "dtype": str(self.dtype), "seed": self.seed}

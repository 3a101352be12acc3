"""A batch of encoded conditions: what a denoiser is conditioned on, one row per sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from diffmem.errors import DiffmemError


@dataclass(frozen=True)
class Condition:
    """Named tensors with a shared leading batch dimension, plus the texts or labels they encode.

    Text models hold ``prompt_embeds`` ([B, L, D]) and, for SDXL, ``text_embeds`` ([B, P]) and
    ``time_ids`` ([B, 6]); class-conditional models hold ``class_labels`` ([B]); unconditional models
    hold nothing and only a batch size.
    """

    tensors: Mapping[str, torch.Tensor]
    batch_size: int
    prompts: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name, tensor in self.tensors.items():
            if tensor.shape[0] != self.batch_size:
                raise DiffmemError(
                    f"condition tensor {name!r} has batch {tensor.shape[0]}, expected {self.batch_size}"
                )
        if self.prompts is not None and len(self.prompts) != self.batch_size:
            raise DiffmemError(f"condition has {len(self.prompts)} prompts for a batch of {self.batch_size}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __len__(self) -> int:
        return self.batch_size

    def replace(self, **tensors: torch.Tensor) -> Condition:
        """The same condition with some tensors swapped (e.g. a prompt embedding that requires grad)."""
        unknown = set(tensors) - set(self.tensors)
        if unknown:
            raise DiffmemError(f"condition has no tensors {sorted(unknown)}; it has {sorted(self.tensors)}")
        return Condition({**self.tensors, **tensors}, self.batch_size, self.prompts)

    def repeat_interleave(self, n: int) -> Condition:
        """Each row repeated n times in place: [a, b] -> [a, a, b, b] (n generations per prompt)."""
        prompts = None if self.prompts is None else tuple(p for p in self.prompts for _ in range(n))
        return Condition(
            {k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()}, self.batch_size * n, prompts
        )

    def select(self, index: Sequence[int] | slice) -> Condition:
        """The rows at ``index``."""
        rows = range(self.batch_size)[index] if isinstance(index, slice) else list(index)
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        prompts = None if self.prompts is None else tuple(self.prompts[i] for i in rows)
        return Condition({k: v[idx.to(v.device)] for k, v in self.tensors.items()}, len(rows), prompts)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Condition:
        """Moved to a device; floating tensors cast to ``dtype`` (integer labels keep theirs)."""
        moved = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
            for k, v in self.tensors.items()
        }
        return Condition(moved, self.batch_size, self.prompts)

    @staticmethod
    def cat(conditions: Sequence[Condition]) -> Condition:
        """Rows of several conditions of one kind stacked in order."""
        keys = set(conditions[0].tensors)
        if any(set(c.tensors) != keys for c in conditions):
            raise DiffmemError("cannot concatenate conditions of different kinds")
        prompts = None
        if all(c.prompts is not None for c in conditions):
            prompts = tuple(p for c in conditions for p in c.prompts)
        tensors = {k: torch.cat([c.tensors[k] for c in conditions]) for k in conditions[0].tensors}
        return Condition(tensors, sum(c.batch_size for c in conditions), prompts)

"""A detector as an accumulating metric: ``update(prompts)`` batch after batch, ``compute()`` at the end
(the torchmetrics shape), flagging prompts above a calibrated threshold and surviving GPU out-of-memory
by halving its batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from diffmem.core.denoiser import Denoiser
from diffmem.detect.detector import DetectionResult, check_prompts
from diffmem.detect.registry import detector
from diffmem.errors import DiffmemError


class Scanner:
    """Scores prompts with one detector and keeps every batch's result until :meth:`reset`."""

    def __init__(
        self,
        denoiser: Denoiser,
        detector_name: str = "noise_norm",
        config: Any = None,
        threshold: float | None = None,
    ) -> None:
        config_class, self._detect = detector(detector_name)
        self.denoiser = denoiser
        self.detector = detector_name
        self.config = config if config is not None else config_class()
        self.threshold = threshold
        self.batch_size = int(self.config.batch_size)
        self.halvings: list[tuple[int, int]] = []  # (from, to) batch sizes after out-of-memory errors
        self.reset()

    def reset(self) -> None:
        """Forget the prompts scored so far (the batch size learned from out-of-memory errors stays)."""
        self._results: list[DetectionResult] = []
        self._ids: list[int] = []

    def update(self, prompts: Sequence[str], prompt_ids: Sequence[int] | None = None) -> DetectionResult:
        """Score a batch of prompts, keep the result and return it (with ``prompt_id`` and ``flagged``)."""
        prompts, ids = check_prompts(prompts, prompt_ids)
        start = len(self._ids)
        ids = ids if prompt_ids is not None else [start + i for i in ids]
        result = self._with_oom_halving(prompts, ids)
        extras = {**result.extras, "prompt_id": torch.tensor(ids, dtype=torch.int64)}
        if self.threshold is not None:
            extras["flagged"] = result.scores > self.threshold
        result = replace(result, extras=extras)
        self._results.append(result)
        self._ids.extend(ids)
        return result

    def compute(self) -> DetectionResult:
        """Every prompt scored since the last reset, in update order."""
        if not self._results:
            raise DiffmemError("compute() called before any update()")
        return DetectionResult.cat(self._results)

    def _with_oom_halving(self, prompts: list[str], ids: list[int]) -> DetectionResult:
        while True:
            config = replace(self.config, batch_size=self.batch_size)
            try:
                return self._detect(self.denoiser, prompts, config, prompt_ids=ids)
            except torch.cuda.OutOfMemoryError as error:
                if self.batch_size == 1:
                    raise DiffmemError("out of GPU memory even at batch size 1") from error
                self.halvings.append((self.batch_size, self.batch_size // 2))
                self.batch_size //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

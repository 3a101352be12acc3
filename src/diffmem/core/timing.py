"""Wall-clock timing that waits for the device: what benchmarks and evaluation reports measure."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait until queued work on ``device`` has finished (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device, repeats: int = 1, warmup: bool = True) -> float:
    """Mean wall seconds of ``work`` over ``repeats`` calls, after one untimed warm-up call."""
    if warmup:
        work()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    synchronize(device)
    return (time.perf_counter() - started) / repeats

"""Faster UNet evaluation that computes the same function: channels-last memory and ``torch.compile``
(``reduce-overhead`` captures CUDA graphs). Diffusers already runs attention through PyTorch's fused
scaled-dot-product kernel; ``benchmarks/detect_throughput.py`` measures each of these against plain."""

from __future__ import annotations

from dataclasses import dataclass

from diffmem.errors import DiffmemError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes


@dataclass(frozen=True)
class Speedups:
    """Which speedups to apply to a denoiser's UNet (none by default)."""

    channels_last: bool = False
    compile_mode: str | None = None  # one of COMPILE_MODES; None runs eagerly

    def __post_init__(self) -> None:
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise DiffmemError(
                f"unknown compile mode {self.compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}"
            )


def apply_speedups(denoiser, speedups: Speedups | None):
    """The denoiser with its network (UNet or transformer) in channels-last memory and/or compiled; the
    first call of each batch shape pays the compilation. Attention processors set later still reach the
    original module."""
    import torch  # here, so the command line checks its speedup options without loading torch

    if speedups is None:
        return denoiser
    name = "unet" if hasattr(denoiser, "unet") else "transformer"  # the attribute its forward pass calls
    if speedups.channels_last:
        getattr(denoiser, name).to(memory_format=torch.channels_last)
    if speedups.compile_mode is not None:
        setattr(denoiser, name, torch.compile(getattr(denoiser, name), mode=speedups.compile_mode))
    return denoiser

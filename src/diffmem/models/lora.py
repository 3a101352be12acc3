"""LoRA adapters loaded into a pipeline through diffusers' PEFT backend, each weighted by its scale."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import DiffusionPipeline

from diffmem.errors import DiffmemError
from diffmem.models.spec import Lora


def apply_loras(pipeline: DiffusionPipeline, loras: Sequence[Lora]) -> None:
    """Load each adapter (into the UNet and the text encoders, as its file holds) and make them all active
    together, each at its scale: ``W + sum_i scale_i * B_i A_i``."""
    if not loras:
        return
    if not hasattr(pipeline, "load_lora_weights"):
        raise DiffmemError(
            f"{type(pipeline).__name__} takes no LoRA adapters; --lora applies to Stable Diffusion and SDXL models"
        )
    names = [f"lora_{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras, strict=True):
        try:
            pipeline.load_lora_weights(str(lora.path), adapter_name=name, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise DiffmemError(f"could not load the LoRA {lora.path} into this model: {error}") from error
    pipeline.set_adapters(names, adapter_weights=[lora.scale for lora in loras])

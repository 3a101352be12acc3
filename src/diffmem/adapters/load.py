"""Turn a local diffusers directory or an in-memory pipeline into the right denoiser adapter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    DiffusionPipeline,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError

from diffmem.adapters.diffusers_base import DiffusersDenoiser
from diffmem.adapters.flux import FluxDenoiser
from diffmem.adapters.pixart import PixArtDenoiser
from diffmem.adapters.stable_diffusion import StableDiffusionDenoiser
from diffmem.adapters.stable_diffusion_3 import StableDiffusion3Denoiser
from diffmem.adapters.stable_diffusion_xl import StableDiffusionXLDenoiser
from diffmem.adapters.unet2d import UNet2DDenoiser
from diffmem.errors import DiffmemError

SUPPORTED = (
    "Stable Diffusion 1.x/2.x, Stable Diffusion XL, Stable Diffusion 3, PixArt-alpha/sigma, "
    "Flux dev/schnell, UNet2DModel (DDPM/DDIM) pipelines"
)
TRANSFORMERS = ("SD3Transformer2DModel", "PixArtTransformer2DModel", "FluxTransformer2DModel")


def wrap_pipeline(pipeline: DiffusionPipeline, **options) -> DiffusersDenoiser:
    """The adapter for an in-memory pipeline, chosen from its components.

    ``options`` go to the adapter: ``resolution``/``clip_skip`` for text models (and
    ``max_sequence_length`` for T5, ``embedded_guidance`` for Flux-dev), ``null_class_label`` for
    class-conditional ``UNet2DModel`` pipelines.
    """
    components = pipeline.components
    if isinstance(components.get("transformer"), SD3Transformer2DModel):
        return StableDiffusion3Denoiser(pipeline, **options)
    if isinstance(components.get("transformer"), PixArtTransformer2DModel):
        return PixArtDenoiser(pipeline, **options)
    if isinstance(components.get("transformer"), FluxTransformer2DModel):
        return FluxDenoiser(pipeline, **options)
    unet = components.get("unet")
    if isinstance(unet, UNet2DConditionModel) and components.get("text_encoder_2") is not None:
        return StableDiffusionXLDenoiser(pipeline, **options)
    if isinstance(unet, UNet2DConditionModel) and components.get("text_encoder") is not None:
        return StableDiffusionDenoiser(pipeline, **options)
    if isinstance(unet, UNet2DModel):
        return UNet2DDenoiser(pipeline, **options)
    raise DiffmemError(f"unsupported pipeline {type(pipeline).__name__}; diffmem supports {SUPPORTED}")


def load_denoiser(
    source: str | Path | DiffusionPipeline,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    checkpoint: Path | None = None,
    **options,
) -> DiffusersDenoiser:
    """A denoiser from a local diffusers model directory (or a pipeline object), on device in dtype.

    ``variant`` picks the directory's weight files (``fp16``: ``*.fp16.safetensors``); ``checkpoint`` is a
    single-file checkpoint (``.safetensors``/``.ckpt``) whose component configs the directory holds.
    """
    if isinstance(source, DiffusionPipeline):
        pipeline = source.to(device)
        return wrap_pipeline(pipeline if pipeline.dtype == dtype else pipeline.to(dtype=dtype), **options)
    directory = Path(source).expanduser()
    index = read_model_index(directory)
    class_name = index["_class_name"]
    unet_class = (index.get("unet") or index.get("transformer") or [None, None])[1]
    if unet_class not in ("UNet2DConditionModel", "UNet2DModel", *TRANSFORMERS):
        raise DiffmemError(
            f"unsupported model family {class_name} in {directory}; diffmem supports {SUPPORTED}"
        )
    # components saved as None (no safety checker, SD3 without T5) load as None, which diffusers asks for
    extra = {name: None for name, entry in index.items() if entry == [None, None]}
    if "safety_checker" in index:
        extra |= {"safety_checker": None, "requires_safety_checker": False}
    try:
        with _without_loading_bars():
            if checkpoint is None:
                pipeline = DiffusionPipeline.from_pretrained(
                    directory, dtype=dtype, local_files_only=True, variant=variant, **extra
                )
            else:  # the pipeline class's own loader: original (LDM) keys, configs from the directory
                pipeline = getattr(diffusers, class_name).from_single_file(
                    str(checkpoint), config=str(directory), dtype=dtype, local_files_only=True, **extra
                )
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SingleFileComponentError) as error:
        origin = directory if checkpoint is None else f"{checkpoint} (configs from {directory})"
        raise DiffmemError(f"could not load the {class_name} in {origin}: {error}") from error
    pipeline.set_progress_bar_config(disable=True)
    return wrap_pipeline(pipeline.to(device), **options)


def read_model_index(directory: Path) -> dict:
    """A diffusers directory's ``model_index.json``, with errors that say what is wrong."""
    if not directory.exists():
        raise DiffmemError(f"no such model directory: {directory}")
    if not directory.is_dir():
        raise DiffmemError(
            f"{directory} is a file; give a diffusers model directory (pipeline.save_pretrained(DIR)), "
            "a .safetensors/.ckpt checkpoint with --model-config DIR, a Hub id ORG/NAME or builtin:NAME"
        )
    index = directory / "model_index.json"
    if not index.is_file():
        raise DiffmemError(
            f"{directory} is not a diffusers model directory (no model_index.json); "
            "save one with pipeline.save_pretrained(DIR)"
        )
    try:
        content = json.loads(index.read_text())
    except json.JSONDecodeError as error:
        raise DiffmemError(f"{index} is not valid JSON: {error}") from error
    if not isinstance(content, dict) or "_class_name" not in content:
        raise DiffmemError(f"{index} is not a diffusers model index (no _class_name)")
    return content


@contextmanager
def _without_loading_bars() -> Iterator[None]:
    """diffusers' and transformers' per-component loading bars off while a local model loads."""
    libraries = (diffusers.utils.logging, transformers.utils.logging)
    enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was in zip(libraries, enabled, strict=True):
            if was:
                library.enable_progress_bar()

"""Turn a local diffusers directory or an in-memory pipeline into the right denoiser adapter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline, UNet2DConditionModel, UNet2DModel

from diffmem.adapters.diffusers_base import DiffusersDenoiser
from diffmem.adapters.stable_diffusion import StableDiffusionDenoiser
from diffmem.adapters.stable_diffusion_xl import StableDiffusionXLDenoiser
from diffmem.adapters.unet2d import UNet2DDenoiser
from diffmem.errors import DiffmemError

SUPPORTED = "Stable Diffusion 1.x/2.x, Stable Diffusion XL, UNet2DModel (DDPM/DDIM) pipelines"


def wrap_pipeline(pipeline: DiffusionPipeline, **options) -> DiffusersDenoiser:
    """The adapter for an in-memory pipeline, chosen from its components.

    ``options`` go to the adapter: ``resolution``/``clip_skip`` for text models, ``null_class_label``
    for class-conditional ``UNet2DModel`` pipelines.
    """
    components = pipeline.components
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
    **options,
) -> DiffusersDenoiser:
    """A denoiser from a local diffusers model directory (or a pipeline object), on device in dtype."""
    if isinstance(source, DiffusionPipeline):
        pipeline = source.to(device)
        return wrap_pipeline(pipeline if pipeline.dtype == dtype else pipeline.to(dtype=dtype), **options)
    directory = Path(source).expanduser()
    index = read_model_index(directory)
    class_name = index["_class_name"]
    unet_class = (index.get("unet") or [None, None])[1]
    if unet_class not in ("UNet2DConditionModel", "UNet2DModel"):
        raise DiffmemError(
            f"unsupported model family {class_name} in {directory}; diffmem supports {SUPPORTED}"
        )
    extra = {}
    if "safety_checker" in index:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        with _without_loading_bars():
            pipeline = DiffusionPipeline.from_pretrained(
                directory, dtype=dtype, local_files_only=True, **extra
            )
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise DiffmemError(f"could not load the {class_name} in {directory}: {error}") from error
    pipeline.set_progress_bar_config(disable=True)
    return wrap_pipeline(pipeline.to(device), **options)


def read_model_index(directory: Path) -> dict:
    """A diffusers directory's ``model_index.json``, with errors that say what is wrong."""
    if not directory.exists():
        raise DiffmemError(f"no such model directory: {directory}")
    if not directory.is_dir():
        raise DiffmemError(
            f"{directory} is a file; give a diffusers model directory (pipeline.save_pretrained(DIR)) "
            "or builtin:NAME"
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

"""LoRA fine-tuning of a text-to-image UNet through peft (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022), set up as diffusers' ``train_text_to_image_lora.py``: adapters on the
attention projections, the base UNet frozen, and the result in diffusers' LoRA format
(``pytorch_lora_weights.safetensors``, loadable with ``load_lora_weights``), its rank and alpha in the
file's metadata. Optionally the CLIP text encoder gets adapters on its attention projections too, as
diffusers' ``train_dreambooth_lora.py --train_text_encoder`` sets them, saved in the same file.

An adapted projection computes ``W x + (alpha / r) B A x`` (Hu et al., eq. 3 with the scale of their §4.1):
``W`` frozen, ``A`` [r, in] and ``B`` [out, r] trained, ``B = 0`` at the start so training starts from
the base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import _set_state_dict_into_text_encoder
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPTextModel

from diffmem.errors import DiffmemError

TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")  # train_text_to_image_lora.py's
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")  # train_dreambooth_lora.py's
TEXT_ENCODER_PREFIX = "text_encoder."  # the text encoder's keys in diffusers' LoRA file
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER = "default"  # peft's name of the one adapter trained


def add_lora(
    unet: UNet2DConditionModel,
    rank: int,
    alpha: float,
    seed: int,
    text_encoder: CLIPTextModel | None = None,
) -> None:
    """Freeze ``unet`` (and ``text_encoder`` when given) and add a trainable adapter of ``rank`` and
    ``alpha`` to its attention projections (peft's "gaussian" initialisation: ``A`` drawn with ``seed``,
    ``B = 0``)."""
    targets = [(unet, TARGET_MODULES)]
    if text_encoder is not None:
        targets.append((text_encoder, TEXT_ENCODER_TARGET_MODULES))
    with torch.random.fork_rng(devices=[]):  # the same adapters for a seed, whatever was drawn before
        torch.manual_seed(seed)
        for model, modules in targets:
            model.requires_grad_(False)
            config = LoraConfig(
                r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(modules)
            )
            if model is text_encoder:
                # transformers' add_adapter asks for a newer peft than its injection needs: inject, and keep
                # the config where add_adapter keeps it
                inject_adapter_in_model(config, model, adapter_name=ADAPTER)
                model.peft_config = {ADAPTER: config}
            else:
                model.add_adapter(config, adapter_name=ADAPTER)


def save_lora(unet: UNet2DConditionModel, directory: Path, text_encoder: CLIPTextModel | None = None) -> Path:
    """Write ``unet``'s adapter (and ``text_encoder``'s) to ``directory/pytorch_lora_weights.safetensors`` in
    diffusers' format, each peft config (rank, alpha, target modules) in the file's metadata; the path."""
    text_metadata = None if text_encoder is None else text_encoder.peft_config[ADAPTER].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=_adapter_layers(unet),
        text_encoder_lora_layers=None if text_encoder is None else _adapter_layers(text_encoder),
        weight_name=WEIGHT_NAME,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
        text_encoder_lora_adapter_metadata=text_metadata,
    )
    return Path(directory) / WEIGHT_NAME


def load_lora(unet: UNet2DConditionModel, directory: Path, text_encoder: CLIPTextModel | None = None) -> None:
    """Set ``unet``'s adapter (and ``text_encoder``'s), added by :func:`add_lora` with the same rank, to the
    weights :func:`save_lora` wrote to ``directory``."""
    stored = load_file(Path(directory) / WEIGHT_NAME)
    layers = {key.removeprefix("unet."): value for key, value in stored.items() if key.startswith("unet.")}
    loaded = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(layers), adapter_name=ADAPTER)
    if loaded.unexpected_keys:
        raise DiffmemError(
            f"the LoRA in {directory} does not fit this UNet's adapter ({len(loaded.unexpected_keys)} "
            f"unexpected tensors, e.g. {loaded.unexpected_keys[0]})"
        )
    adapts_text = any(key.startswith(TEXT_ENCODER_PREFIX) for key in stored)
    if adapts_text != (text_encoder is not None):
        held = "holds" if adapts_text else "holds no"
        raise DiffmemError(f"the LoRA in {directory} {held} a text-encoder adapter, unlike this run's")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(stored, TEXT_ENCODER_PREFIX, text_encoder)


def checkpoint_adapter_only(accelerator: Accelerator) -> None:
    """Make ``accelerator``'s checkpoints hold the prepared UNet's adapter, and the text encoder's when it
    trains one (as :func:`save_lora` writes them), instead of whole models, whose frozen bases are the
    model the run started from (as diffusers' LoRA scripts' save and load hooks do)."""

    def save(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        weights.clear()  # accelerate writes no model file
        if accelerator.is_main_process:
            unet, text_encoder = _unwrapped(accelerator, models)
            save_lora(unet, Path(output_dir), text_encoder)

    def load(models: list[torch.nn.Module], input_dir: str) -> None:
        unet, text_encoder = _unwrapped(accelerator, models)
        load_lora(unet, Path(input_dir), text_encoder)
        models.clear()  # accelerate loads no model

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _adapter_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=ADAPTER))


def _unwrapped(
    accelerator: Accelerator, models: list[torch.nn.Module]
) -> tuple[UNet2DConditionModel, CLIPTextModel | None]:
    """A checkpoint hook's prepared models, unwrapped: the UNet, and the text encoder or None."""
    unwrapped = [accelerator.unwrap_model(model) for model in models]
    unet = next(m for m in unwrapped if isinstance(m, UNet2DConditionModel))
    return unet, next((m for m in unwrapped if isinstance(m, CLIPTextModel)), None)

"""LoRA fine-tuning of a text-to-image UNet through peft (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022), set up as diffusers' ``train_text_to_image_lora.py``: adapters on the
attention projections, the base UNet frozen, and the result in diffusers' LoRA format
(``pytorch_lora_weights.safetensors``, loadable with ``load_lora_weights``), its rank and alpha in the
file's metadata.

An adapted projection computes ``W x + (alpha / r) B A x`` (Hu et al., eq. 3 with the scale of their §4.1):
``W`` frozen, ``A`` [r, in] and ``B`` [out, r] trained, ``B = 0`` at the start so training starts from
the base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from diffmem.errors import DiffmemError

TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")  # train_text_to_image_lora.py's
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER = "default"  # peft's name of the one adapter trained


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, seed: int) -> None:
    """Freeze ``unet`` and add a trainable adapter of ``rank`` and ``alpha`` to its attention projections
    (peft's "gaussian" initialisation: ``A`` drawn with ``seed``, ``B = 0``)."""
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES)
    )
    with torch.random.fork_rng(devices=[]):  # the same adapter for a seed, whatever was drawn before
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER)


def save_lora(unet: UNet2DConditionModel, directory: Path) -> Path:
    """Write ``unet``'s adapter to ``directory/pytorch_lora_weights.safetensors`` in diffusers' format, with
    its peft config (rank, alpha, target modules) as the file's metadata; the file's path."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=layers,
        weight_name=WEIGHT_NAME,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
    )
    return Path(directory) / WEIGHT_NAME


def load_lora(unet: UNet2DConditionModel, directory: Path) -> None:
    """Set ``unet``'s adapter (added by :func:`add_lora` with the same rank) to the weights
    :func:`save_lora` wrote to ``directory``."""
    stored = load_file(Path(directory) / WEIGHT_NAME)
    layers = {key.removeprefix("unet."): value for key, value in stored.items()}
    loaded = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(layers), adapter_name=ADAPTER)
    if loaded.unexpected_keys:
        raise DiffmemError(
            f"the LoRA in {directory} does not fit this UNet's adapter ({len(loaded.unexpected_keys)} "
            f"unexpected tensors, e.g. {loaded.unexpected_keys[0]})"
        )


def checkpoint_adapter_only(accelerator: Accelerator) -> None:
    """Make ``accelerator``'s checkpoints hold the prepared UNet's adapter (as :func:`save_lora` writes it)
    instead of the whole UNet, whose frozen base is the model the run started from (as diffusers' LoRA
    scripts' save and load hooks do)."""

    def save(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        weights.pop()  # accelerate writes no model file
        if accelerator.is_main_process:
            save_lora(accelerator.unwrap_model(models[0]), Path(output_dir))

    def load(models: list[torch.nn.Module], input_dir: str) -> None:
        load_lora(accelerator.unwrap_model(models.pop()), Path(input_dir))  # accelerate loads no model

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)

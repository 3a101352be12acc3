"""LoRA fine-tuning of a text-to-image UNet, or of Stable Diffusion 3's MMDiT, through peft (Hu et al.,
"LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022), set up as diffusers' LoRA scripts set it
up (``train_text_to_image_lora.py`` for a UNet, ``train_dreambooth_lora_sd3.py`` for SD3: adapters on the
attention projections, the image stream's and the text stream's), the base network frozen, and the
result in diffusers' LoRA format (``pytorch_lora_weights.safetensors``, loadable with
``load_lora_weights``), its rank and alpha in the file's metadata. Optionally the CLIP text encoder gets
adapters on its attention projections too, as diffusers' ``train_dreambooth_lora.py --train_text_encoder``
sets them, saved in the same file.

An adapted projection computes ``W x + (alpha / r) B A x`` (Hu et al., eq. 3 with the scale of their §4.1):
``W`` frozen, ``A`` [r, in] and ``B`` [out, r] trained, ``B = 0`` at the start so training starts from
the base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.training_utils import _set_state_dict_into_text_encoder
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPTextModel

from diffmem.errors import DiffmemError

TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")  # train_text_to_image_lora.py's
SD3_TARGET_MODULES = (  # train_dreambooth_lora_sd3.py's: both streams of the joint attention
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")  # train_dreambooth_lora.py's
TEXT_ENCODER_PREFIX = "text_encoder."  # the text encoder's keys in diffusers' LoRA file
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER = "default"  # peft's name of the one adapter trained


def target_modules(network: torch.nn.Module) -> tuple[str, ...]:
    """The projections a network's adapter sits on: SD3's MMDiT's, or a UNet's."""
    return SD3_TARGET_MODULES if isinstance(network, SD3Transformer2DModel) else TARGET_MODULES


def add_lora(
    network: torch.nn.Module,
    rank: int,
    alpha: float,
    seed: int,
    text_encoder: CLIPTextModel | None = None,
) -> None:
    """Freeze ``network`` (a UNet or SD3's MMDiT; and ``text_encoder`` when given) and add a trainable
    adapter of ``rank`` and ``alpha`` to its attention projections (peft's "gaussian" initialisation: ``A``
    drawn with ``seed``, ``B = 0``)."""
    targets = [(network, target_modules(network))]
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


def save_lora(network: torch.nn.Module, directory: Path, text_encoder: CLIPTextModel | None = None) -> Path:
    """Write ``network``'s adapter (and ``text_encoder``'s) to ``directory/pytorch_lora_weights.safetensors``
    in diffusers' format, each peft config (rank, alpha, target modules) in the file's metadata; the path."""
    metadata = network.peft_config[ADAPTER].to_dict()
    if isinstance(network, SD3Transformer2DModel):
        StableDiffusion3Pipeline.save_lora_weights(
            directory,
            transformer_lora_layers=get_peft_model_state_dict(network, adapter_name=ADAPTER),
            weight_name=WEIGHT_NAME,
            transformer_lora_adapter_metadata=metadata,
        )
        return Path(directory) / WEIGHT_NAME
    text_metadata = None if text_encoder is None else text_encoder.peft_config[ADAPTER].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=_adapter_layers(network),
        text_encoder_lora_layers=None if text_encoder is None else _adapter_layers(text_encoder),
        weight_name=WEIGHT_NAME,
        unet_lora_adapter_metadata=metadata,
        text_encoder_lora_adapter_metadata=text_metadata,
    )
    return Path(directory) / WEIGHT_NAME


def load_lora(network: torch.nn.Module, directory: Path, text_encoder: CLIPTextModel | None = None) -> None:
    """Set ``network``'s adapter (and ``text_encoder``'s), added by :func:`add_lora` with the same rank, to
    the weights :func:`save_lora` wrote to ``directory``."""
    stored = load_file(Path(directory) / WEIGHT_NAME)
    prefix = "transformer." if isinstance(network, SD3Transformer2DModel) else "unet."
    layers = {key.removeprefix(prefix): value for key, value in stored.items() if key.startswith(prefix)}
    loaded = set_peft_model_state_dict(network, convert_unet_state_dict_to_peft(layers), adapter_name=ADAPTER)
    if loaded.unexpected_keys:
        raise DiffmemError(
            f"the LoRA in {directory} does not fit this network's adapter ({len(loaded.unexpected_keys)} "
            f"unexpected tensors, e.g. {loaded.unexpected_keys[0]})"
        )
    adapts_text = any(key.startswith(TEXT_ENCODER_PREFIX) for key in stored)
    if adapts_text != (text_encoder is not None):
        held = "holds" if adapts_text else "holds no"
        raise DiffmemError(f"the LoRA in {directory} {held} a text-encoder adapter, unlike this run's")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(stored, TEXT_ENCODER_PREFIX, text_encoder)


def checkpoint_adapter_only(accelerator: Accelerator) -> None:
    """Make ``accelerator``'s checkpoints hold the prepared network's adapter, and the text encoder's when it
    trains one (as :func:`save_lora` writes them), instead of whole models, whose frozen bases are the
    model the run started from (as diffusers' LoRA scripts' save and load hooks do)."""

    def save(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        weights.clear()  # accelerate writes no model file
        if accelerator.is_main_process:
            network, text_encoder = _unwrapped(accelerator, models)
            save_lora(network, Path(output_dir), text_encoder)

    def load(models: list[torch.nn.Module], input_dir: str) -> None:
        network, text_encoder = _unwrapped(accelerator, models)
        load_lora(network, Path(input_dir), text_encoder)
        models.clear()  # accelerate loads no model

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _adapter_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=ADAPTER))


def _unwrapped(
    accelerator: Accelerator, models: list[torch.nn.Module]
) -> tuple[torch.nn.Module, CLIPTextModel | None]:
    """A checkpoint hook's prepared models, unwrapped: the denoising network, and the text encoder or None."""
    unwrapped = [accelerator.unwrap_model(model) for model in models]
    network = next(m for m in unwrapped if not isinstance(m, CLIPTextModel))
    return network, next((m for m in unwrapped if isinstance(m, CLIPTextModel)), None)

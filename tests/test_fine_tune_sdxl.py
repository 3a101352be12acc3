"""Fine-tuning SDXL: a tiny random-weight SDXL pipeline on a six-image folder, a few steps on CPU — the UNet
is conditioned in training as the pipeline conditions it when it generates, full and LoRA runs train under
the policies, and the adapter loads with diffusers and with ``--lora``."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from diffmem.models.tiny import tiny_stable_diffusion_xl
from fine_tune_checks import (
    check_full_and_lora_fine_tuning,
    check_training_predicts_as_the_denoiser,
    saved_pipeline,
)


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    return saved_pipeline(tiny_stable_diffusion_xl(), tmp_path_factory, "sdxl")


def _prediction(unet) -> torch.Tensor:
    """The UNet's output on a fixed latent, timestep and conditioning of the tiny SDXL's sizes."""
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8, generator=generator)
    states = torch.randn(1, 77, 64, generator=generator)
    added = {
        "text_embeds": torch.randn(1, 32, generator=generator),
        "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]),
    }
    with torch.no_grad():
        return unet(x_t, torch.tensor([500]), encoder_hidden_states=states, added_cond_kwargs=added).sample


def test_training_conditions_the_unet_as_the_pipeline_does_when_it_generates(sdxl_model, photos):
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    alpha_bar = lambda denoiser, t: denoiser.alpha_bar(t).float()
    check_training_predicts_as_the_denoiser(sdxl_model, photos, x_t, torch.tensor([700, 300]), alpha_bar)


@pytest.mark.supports("fine-tuning", "stable-diffusion-xl")
def test_sdxl_fine_tunes_fully_and_with_lora_under_the_policies(sdxl_model, photos, tmp_path):
    weights = "unet/diffusion_pytorch_model.safetensors"
    check_full_and_lora_fine_tuning(
        sdxl_model,
        photos,
        tmp_path,
        "stable-diffusion-xl",
        "SDXL",
        StableDiffusionXLPipeline,
        weights,
        _prediction,
    )

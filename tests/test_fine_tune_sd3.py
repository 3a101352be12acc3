"""Fine-tuning Stable Diffusion 3: a tiny random-weight SD3 pipeline (MMDiT, rectified flow) on a six-image
folder, a few steps on CPU — the MMDiT is conditioned in training as the pipeline conditions it when it
generates, full and LoRA runs train under the policies, the adapter loads with diffusers and with
``--lora``, and an interrupted LoRA run resumes to the same adapter."""

import importlib

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from diffmem.errors import DiffmemError
from diffmem.models.tiny import tiny_stable_diffusion_3
from diffmem.train.fine_tune import FineTuneConfig, fine_tune
from diffmem.train.training_set import DataOptions
from fine_tune_checks import (
    check_full_and_lora_fine_tuning,
    check_training_predicts_as_the_denoiser,
    saved_pipeline,
)

fine_tune_module = importlib.import_module("diffmem.train.fine_tune")  # the package exports the function
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    return saved_pipeline(tiny_stable_diffusion_3(), tmp_path_factory, "sd3")


def _prediction(transformer) -> torch.Tensor:
    """The MMDiT's velocity on a fixed latent, timestep and conditioning of the tiny SD3's sizes."""
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8, generator=generator)
    config = transformer.config
    states = torch.randn(1, 12, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        return transformer(
            hidden_states=x_t,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=states,
            pooled_projections=pooled,
        ).sample


def test_training_conditions_the_mmdit_as_the_pipeline_does_when_it_generates(sd3_model, photos):
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0, 300.0])
    data = check_training_predicts_as_the_denoiser(sd3_model, photos, x_t, t, lambda denoiser, t: t / 1000)
    assert data.flow and data.prediction_type == "flow_prediction"

    # the draws: SD3's timesteps on the 0..1000 scale of s, the input on the straight path from the latents
    draw = fine_tune_module._Draws(data, 0.0, 0, 0, None)
    batch, t, s, x_t = draw(0)
    torch.testing.assert_close(t, s * 1000)
    assert ((s > 0) & (s <= 1)).all() and len(set(s.tolist())) > 1
    z = (x_t - (1 - s.view(-1, 1, 1, 1)) * batch.latents) / s.view(-1, 1, 1, 1)
    assert abs(float(z.std()) - 1) < 0.3  # what is left of x_t beyond (1 - s) x_0 is s times unit noise
    assert fine_tune_module._Draws(data, 1.0, 0, 0, None)(0)[0].latents.equal(batch.latents)
    assert data.ambient_timestep(1.0) == 500.0  # s_n = sigma_n / (1 + sigma_n)


@pytest.mark.supports("fine-tuning", "stable-diffusion-3")
def test_sd3_fine_tunes_fully_and_with_lora_under_the_policies(sd3_model, photos, tmp_path):
    check_full_and_lora_fine_tuning(
        sd3_model,
        photos,
        tmp_path,
        "stable-diffusion-3",
        "SD3",
        StableDiffusion3Pipeline,
        WEIGHTS,
        _prediction,
    )
    stored = load_file(tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors")
    assert any(".attn.add_k_proj.lora_B" in key for key in stored)  # the text stream's projections too


def test_an_interrupted_sd3_lora_run_resumes_to_the_same_adapter(sd3_model, photos, tmp_path):
    config = FineTuneConfig(steps=3, batch_size=2, lr=1e-3, lora_rank=2, checkpoint_every=1)
    assert fine_tune(sd3_model, photos, tmp_path / "whole", config, progress=False).complete
    parted = tmp_path / "parted"
    status = fine_tune(sd3_model, photos, parted, config, time_budget_s=0.0, progress=False)
    assert not status.complete and status.step == 1
    assert fine_tune(sd3_model, photos, parted, config, progress=False).complete
    whole = load_file(tmp_path / "whole" / "lora" / "pytorch_lora_weights.safetensors")
    resumed = load_file(parted / "lora" / "pytorch_lora_weights.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_resolution_beyond_the_mmdits_position_embedding_is_refused_before_training(
    sd3_model, photos, tmp_path
):
    options = DataOptions(resolution=64)  # 32 latent patches a side; the tiny MMDiT embeds 8
    with pytest.raises(DiffmemError, match="covers 8: pass --resolution 16 or less"):
        fine_tune(sd3_model, photos, tmp_path / "run", FineTuneConfig(steps=1), False, data_options=options)
    assert not (tmp_path / "run" / "checkpoint").exists()

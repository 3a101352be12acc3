"""Fine-tuning SDXL: a tiny random-weight SDXL pipeline on a six-image folder, a few steps on CPU — the UNet
is conditioned in training as the pipeline conditions it when it generates, full and LoRA runs train under
the policies, and the adapter loads with diffusers and with ``--lora``."""

import importlib

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from diffmem.adapters import load_denoiser
from diffmem.errors import DiffmemError
from diffmem.models.source import open_model
from diffmem.models.spec import model_spec
from diffmem.models.tiny import tiny_stable_diffusion_xl
from diffmem.train.fine_tune import FineTuneConfig, fine_tune
from diffmem.train.training_set import DataOptions

fine_tune_module = importlib.import_module("diffmem.train.fine_tune")  # the package exports the function
POLICIES = {"filter": {"threshold": 100.0}, "ambient": {"sigma_n": 0.5}, "captions": {"p": 0.5}}
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sdxl") / "model"
    tiny_stable_diffusion_xl().save_pretrained(directory)
    return directory


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
    pipeline = fine_tune_module._open_pipeline(sdxl_model)
    training = fine_tune_module._training_set(pipeline, photos, DataOptions())
    data = fine_tune_module._Data(pipeline, training, FineTuneConfig(), torch.device("cpu"), False)
    denoiser = load_denoiser(sdxl_model)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 300])
    captions = ["a photo number 1", "a photo number 4"]
    alpha_bar = denoiser.alpha_bar(t).float()
    with torch.no_grad():
        trained = data.eps(pipeline.unet(x_t, t, **data._condition(captions)).sample, x_t, alpha_bar)
        unconditional = data.eps(pipeline.unet(x_t, t, **data.null_condition(2)).sample, x_t, alpha_bar)
        generated = denoiser.eps(x_t, t, denoiser.encode(captions))
        empty = denoiser.eps(x_t, t, denoiser.encode(["", ""]))
    torch.testing.assert_close(trained, generated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unconditional, empty, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, unconditional)


@pytest.mark.supports("fine-tuning", "stable-diffusion-xl")
def test_sdxl_fine_tunes_fully_and_with_lora_under_the_policies(sdxl_model, photos, tmp_path):
    full = FineTuneConfig(steps=2, batch_size=2, lr=1e-3, policies=POLICIES)
    status = fine_tune(sdxl_model, photos, tmp_path / "full", full, progress=False)
    assert status.complete and status.drop_rate == 0.0
    assert load_denoiser(tmp_path / "full" / "model").family == "stable-diffusion-xl"
    before, after = (
        load_file(sdxl_model / UNET_WEIGHTS),
        load_file(tmp_path / "full" / "model" / UNET_WEIGHTS),
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)

    lora = FineTuneConfig(steps=2, batch_size=2, lr=1e-3, lora_rank=2, policies=POLICIES)
    assert fine_tune(sdxl_model, photos, tmp_path / "lora", lora, progress=False).complete
    base = _prediction(StableDiffusionXLPipeline.from_pretrained(sdxl_model).unet)
    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_model)
    pipeline.load_lora_weights(tmp_path / "lora" / "lora", local_files_only=True)
    loaded = _prediction(pipeline.unet)
    assert not torch.allclose(loaded, base)
    denoiser = open_model(model_spec(str(sdxl_model), loras=[str(tmp_path / "lora" / "lora")]))
    torch.testing.assert_close(_prediction(denoiser.pipeline.unet), loaded, rtol=0, atol=0)

    with_text = FineTuneConfig(steps=2, batch_size=2, lora_rank=2, lora_text_encoder=True)
    with pytest.raises(DiffmemError, match="for SDXL drop --lora-text-encoder"):
        fine_tune(sdxl_model, photos, tmp_path / "text", with_text, progress=False)

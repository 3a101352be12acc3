"""With no guidance terms, the sampler reproduces diffusers' own pipelines for the same seeds (CPU, float32)."""

import pytest
import torch

from diffmem.adapters import wrap_pipeline
from diffmem.models.tiny import tiny_stable_diffusion, tiny_stable_diffusion_xl, tiny_unet2d
from diffmem.sampling import sample

PROMPTS = ["a red sneaker at the top left", "a blue bag at the bottom right on a gray background"]
SEEDS = [3, 11]
TOLERANCE = 1e-5


def _generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _pipeline_output(pipe, output_type, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, generator=_generators(), output_type=output_type, **kwargs).images


def _ours(pipe, **kwargs):
    denoiser = wrap_pipeline(pipe)
    latents = sample(denoiser, denoiser.encode(PROMPTS), SEEDS, **kwargs)
    return latents, denoiser.decode(latents)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "pndm", "euler"])
def test_stable_diffusion_epsilon(scheduler):
    pipe = tiny_stable_diffusion(scheduler=scheduler)
    settings = {"num_inference_steps": 5, "guidance_scale": 7.5}
    latents, images = _ours(pipe, **settings)
    assert (latents - _pipeline_output(pipe, "latent", **settings)).abs().max() <= TOLERANCE
    assert (images - _pipeline_output(pipe, "pt", **settings)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "ddpm"])
def test_stable_diffusion_2_v_prediction(scheduler):
    """v outputs are converted to eps, so output images match to 1e-5.

    Latents carry float32 rounding of the v -> eps conversion, which the scheduler's x0 estimate
    multiplies by sigma_T = sqrt((1 - abar_T) / abar_T) ~ 15: about 1e-5, bounded here at 3e-5.
    """
    pipe = tiny_stable_diffusion(prediction_type="v_prediction", scheduler=scheduler)
    settings = {"num_inference_steps": 6, "guidance_scale": 9.0}
    latents, images = _ours(pipe, **settings)
    assert (images - _pipeline_output(pipe, "pt", **settings)).abs().max() <= TOLERANCE
    assert (latents - _pipeline_output(pipe, "latent", **settings)).abs().max() <= 3 * TOLERANCE


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_stable_diffusion_xl(scheduler):
    pipe = tiny_stable_diffusion_xl(scheduler=scheduler)
    settings = {"num_inference_steps": 5, "guidance_scale": 5.0}
    latents, images = _ours(pipe, **settings)
    size = {"height": 16, "width": 16}
    assert (latents - _pipeline_output(pipe, "latent", **settings, **size)).abs().max() <= TOLERANCE
    assert (images - _pipeline_output(pipe, "pt", **settings, **size)).abs().max() <= TOLERANCE


def _unconditional_parity(pipe, **call):
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(batch_size=2, generator=_generators(), output_type="np", **call).images
    denoiser = wrap_pipeline(pipe)
    steps = call["num_inference_steps"]
    latents = sample(
        denoiser, denoiser.encode([None, None]), SEEDS, num_inference_steps=steps, eta=call.get("eta", 0.0)
    )
    ours = denoiser.decode(latents).permute(0, 2, 3, 1).numpy()
    return abs(ours - reference).max()


def test_ddpm_pipeline():
    assert _unconditional_parity(tiny_unet2d(scheduler="ddpm"), num_inference_steps=8) <= TOLERANCE


def test_ddpm_pipeline_with_learned_variance():
    pipe = tiny_unet2d(scheduler="ddpm", learned_variance=True)
    assert _unconditional_parity(pipe, num_inference_steps=8) <= TOLERANCE


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_pipeline(eta):
    assert _unconditional_parity(tiny_unet2d(scheduler="ddim"), num_inference_steps=8, eta=eta) <= TOLERANCE

"""Noise-norm detection (SPEC §1): invariants on tiny random-weight pipelines."""

from dataclasses import replace

import pytest
import torch

from diffmem.adapters import wrap_pipeline
from diffmem.detect import NoiseNormConfig, noise_norm
from diffmem.errors import DiffmemError
from diffmem.models.tiny import tiny_stable_diffusion, tiny_stable_diffusion_xl
from diffmem.sampling import generation_seed
from diffmem.sampling.guided_sampler import eps_scheduler

PROMPTS = ["a red sneaker at the top left", "a blue bag", "three green hats on a navy background"]


def test_the_empty_prompt_scores_zero(sd):
    result = noise_norm(sd, ["", PROMPTS[0]], NoiseNormConfig(num_inference_steps=5))
    assert result.scores[0] < 1e-5 < result.scores[1]


@pytest.mark.supports("detection", "stable-diffusion")
def test_first_step_score_is_the_norm_of_the_text_conditional_prediction_at_x_T(sd):
    result = noise_norm(sd, PROMPTS, NoiseNormConfig(num_inference_steps=10), prompt_ids=[4, 5, 6])
    paper = noise_norm(
        sd, PROMPTS, NoiseNormConfig(num_inference_steps=10, centered=False), prompt_ids=[4, 5, 6]
    )
    schedule = eps_scheduler(sd.scheduler)
    schedule.set_timesteps(10)
    t = schedule.timesteps[0]
    for i, prompt in enumerate(PROMPTS):
        seed = generation_seed(0, 4 + i, 0)
        x_T = torch.randn((1, *sd.sample_shape), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            d = sd.eps(x_T, t, sd.encode([prompt])) - sd.eps(x_T, t, sd.null_condition(1))
        assert result.seeds[i, 0] == seed
        centred = d - d.mean(dim=(2, 3), keepdim=True)  # each channel's mean over positions taken out
        torch.testing.assert_close(result.scores[i], centred.flatten().norm(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(paper.scores[i], d.flatten().norm(), rtol=1e-4, atol=1e-5)
        assert paper.scores[i] > result.scores[i]


def test_scores_do_not_depend_on_batching(sd):
    config = NoiseNormConfig(num_inference_steps=4, steps=2, n_generations=2)
    small = noise_norm(sd, PROMPTS, replace(config, batch_size=1))
    large = noise_norm(sd, PROMPTS, config)
    torch.testing.assert_close(small.extras["per_step"], large.extras["per_step"], rtol=1e-4, atol=1e-4)


def test_step_modes_and_cost(sd):
    first = noise_norm(sd, PROMPTS, NoiseNormConfig(num_inference_steps=5))
    every = noise_norm(sd, PROMPTS, NoiseNormConfig(num_inference_steps=5, steps=None, n_generations=2))
    assert first.extras["per_step"].shape == (3, 1, 1) and first.unet_evaluations_per_prompt == 2
    assert every.extras["per_step"].shape == (3, 2, 5) and every.unet_evaluations_per_prompt == 20
    torch.testing.assert_close(every.scores, every.extras["per_step"].mean(dim=(1, 2)))
    torch.testing.assert_close(
        every.extras["per_step"][:, 0, 0], first.extras["per_step"][:, 0, 0]
    )  # same x_T, same first step


@pytest.mark.supports("detection", "stable-diffusion-xl")
def test_any_text_family():
    sdxl = wrap_pipeline(tiny_stable_diffusion_xl())
    v_pred = wrap_pipeline(tiny_stable_diffusion(prediction_type="v_prediction"))
    for denoiser in (sdxl, v_pred):
        scores = noise_norm(denoiser, PROMPTS, NoiseNormConfig(num_inference_steps=3)).scores
        assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores > 0).all()


def test_bad_input(sd):
    with pytest.raises(DiffmemError, match="needs classifier-free guidance; got guidance_scale=1.0"):
        noise_norm(sd, PROMPTS, NoiseNormConfig(guidance_scale=1.0))
    with pytest.raises(
        DiffmemError, match="first steps to measure must be between 1 and num_inference_steps=5"
    ):
        noise_norm(sd, PROMPTS, NoiseNormConfig(num_inference_steps=5, steps=6))
    with pytest.raises(DiffmemError, match="one id per prompt"):
        noise_norm(sd, PROMPTS, prompt_ids=[1])


def test_shared_noise_reuses_the_unconditional_prediction_at_the_first_step(sd):
    config = NoiseNormConfig(num_inference_steps=5, n_generations=2, shared_noise=True, batch_size=4)
    fast = noise_norm(sd, PROMPTS, config)
    # the same seeds through the general sampler path (first k steps, k = 1, without the reuse)
    seeds = fast.seeds
    assert (seeds == seeds[0]).all() and seeds[0, 0] != seeds[0, 1]  # one x_T per generation, shared
    general = noise_norm(sd, PROMPTS, replace(config, steps=2))
    torch.testing.assert_close(fast.extras["per_step"][..., 0], general.extras["per_step"][..., 0])
    # rows (prompt x generation) = 6 conditional calls + 2 distinct seeds per batch of 4 (2 batches)
    assert fast.unet_evaluations_per_prompt == (6 + 2 + 2) / 3
    assert general.unet_evaluations_per_prompt == 2 * 2 * 2


def test_reduced_precision_scores_track_float32():
    config = NoiseNormConfig(num_inference_steps=5)
    reference = noise_norm(wrap_pipeline(tiny_stable_diffusion()), PROMPTS, config).scores
    low = noise_norm(wrap_pipeline(tiny_stable_diffusion().to(dtype=torch.bfloat16)), PROMPTS, config).scores
    assert low.dtype == torch.float32  # norms are taken in float32 whatever the model runs in
    torch.testing.assert_close(low, reference, rtol=0.05, atol=1e-3)

"""Peer detectors (SPEC §7): sharpness, cross-attention entropy, generation agreement, one-step error,
checked on tiny random-weight pipelines against hand computations."""

import math
from dataclasses import replace

import pytest
import torch
from diffusers.models.attention_processor import Attention

from diffmem.adapters import wrap_pipeline
from diffmem.core.condition import Condition
from diffmem.detect import NoiseNormConfig, noise_norm
from diffmem.detect.attention_entropy import (
    AttentionEntropyConfig,
    attention_entropy,
    recording_cross_attention,
    token_entropy,
)
from diffmem.detect.detector import detection_seeds
from diffmem.detect.first_step import first_step, first_step_input
from diffmem.detect.generation_agreement import (
    GenerationAgreementConfig,
    generation_agreement,
    nearest_sibling_distance,
    tiled_l2,
)
from diffmem.detect.one_step import OneStepConfig, one_step
from diffmem.detect.sharpness import SharpnessConfig, sharpness
from diffmem.errors import DiffmemError
from diffmem.models.tiny import tiny_stable_diffusion, tiny_stable_diffusion_xl, tiny_unet2d
from diffmem.sampling import generation_seed
from diffmem.sampling.guided_sampler import eps_scheduler

PROMPTS = ["a red sneaker at the top left", "a blue bag", "three green hats on a navy background"]
STEPS = 5
CROSS_ATTENTION_LAYERS = 4  # tiny SD: one in the down block, one in the middle, two in the up block


@pytest.fixture(scope="module")
def sd64():
    pipeline = tiny_stable_diffusion()
    pipeline.to(torch.float64)
    return wrap_pipeline(pipeline)


def _x_T(denoiser, prompt_id, generation=0):
    """x_T of a generation as the detectors draw it (float32, from its own seed), and the first t."""
    seed = generation_seed(0, prompt_id, generation)
    x_T = torch.randn((1, *denoiser.sample_shape), generator=torch.Generator().manual_seed(seed))
    schedule = eps_scheduler(denoiser.scheduler)
    schedule.set_timesteps(STEPS)
    return x_T, schedule.timesteps[0]


def _difference(denoiser, t, prompt):
    """d(x) = eps_cond(x) - eps_uncond(x) at t, by two separate calls."""
    cond, null = denoiser.encode([prompt]), denoiser.null_condition(1)
    return lambda x: denoiser.eps(x, t, cond) - denoiser.eps(x, t, null)


# --- shared first step -------------------------------------------------------------------------------


def test_first_step_input_is_the_samplers_x_T(sd):
    seeds = detection_seeds(0, [0, 1, 2], 1)
    x_T, t = first_step_input(sd, seeds, STEPS)
    step = first_step(sd, sd.encode(PROMPTS), seeds, STEPS)
    assert torch.equal(x_T, step.x_t) and t == step.t
    with pytest.raises(DiffmemError, match="num_inference_steps must be at least 1"):
        first_step_input(sd, seeds, 0)


# --- sharpness -----------------------------------------------------------------------------------------


def test_sharpness_is_the_derivative_of_d_along_itself_at_x_T(sd, sd64):
    result = sharpness(sd, PROMPTS, SharpnessConfig(num_inference_steps=STEPS), prompt_ids=[4, 5, 6])
    h = 1e-3
    for i, prompt in enumerate(PROMPTS):
        x_T, t = _x_T(sd64, 4 + i)
        x = x_T.double()
        d = _difference(sd64, t, prompt)
        with torch.no_grad():
            v = d(x)
            finite_difference = (d(x + h * v) - d(x - h * v)) / (2 * h)
        assert result.seeds[i, 0] == generation_seed(0, 4 + i, 0)
        torch.testing.assert_close(result.scores[i].double(), finite_difference.norm(), rtol=1e-3, atol=1e-7)
        centred = v - v.mean(dim=(2, 3), keepdim=True)  # the noise norm's measure
        torch.testing.assert_close(result.extras["d_norm"][i].double(), centred.norm(), rtol=1e-4, atol=1e-6)


def test_the_empty_prompt_has_zero_sharpness_and_cost_counts_the_jvp(sd):
    result = sharpness(sd, ["", *PROMPTS], SharpnessConfig(num_inference_steps=STEPS, n_generations=2))
    assert result.scores[0] < 1e-6 and (result.scores[1:] > 1e-4).all()
    assert result.scores.shape == (4,) and result.seeds.shape == (4, 2) and not result.scores.requires_grad
    assert result.unet_evaluations_per_prompt == 2 * (2 + 2 * 3)  # per generation: pair + JVP of the pair


def test_sharpness_noise_norm_is_noise_norms_first_step_and_batching_does_not_matter(sd):
    config = SharpnessConfig(num_inference_steps=STEPS, n_generations=2, batch_size=4)
    large = sharpness(sd, PROMPTS, config)
    small = sharpness(sd, PROMPTS, replace(config, batch_size=1))
    torch.testing.assert_close(small.scores, large.scores, rtol=1e-4, atol=1e-6)
    norms = noise_norm(sd, PROMPTS, NoiseNormConfig(num_inference_steps=STEPS, n_generations=2))
    assert torch.equal(norms.seeds, large.seeds)
    torch.testing.assert_close(large.extras["d_norm"], norms.scores, rtol=1e-4, atol=1e-6)


def test_sharpness_in_other_families_and_on_unconditional_models():
    sdxl = wrap_pipeline(tiny_stable_diffusion_xl())
    v_pred = wrap_pipeline(tiny_stable_diffusion(prediction_type="v_prediction"))
    for denoiser in (sdxl, v_pred):
        scores = sharpness(denoiser, PROMPTS, SharpnessConfig(num_inference_steps=3)).scores
        assert torch.isfinite(scores).all() and (scores > 0).all()
    with pytest.raises(DiffmemError, match="this model is unconditional"):
        sharpness(wrap_pipeline(tiny_unet2d()), [None])


# --- attention entropy -------------------------------------------------------------------------------


def _processors(network):
    return {name: id(p) for name, p in network.attn_processors.items()}


def test_recorder_sees_every_cross_attention_layer_and_changes_nothing(sd):
    network = sd.network
    assert sum(isinstance(m, Attention) and m.is_cross_attention for m in network.modules()) == 4
    before = _processors(network)
    x_T, t = first_step_input(sd, [1, 2, 3], STEPS)
    cond = sd.encode(PROMPTS)
    with torch.no_grad():
        default = sd.eps(x_T, t, cond)
        with recording_cross_attention(network) as maps:
            recorded = sd.eps(x_T, t, cond)
    assert _processors(network) == before
    torch.testing.assert_close(recorded, default, rtol=0, atol=1e-5)
    assert len(maps) == CROSS_ATTENTION_LAYERS
    for distribution in maps:
        assert distribution.shape == (3, 77) and (distribution > 0).all()
        torch.testing.assert_close(distribution.sum(dim=1), torch.ones(3))


def test_recorder_in_a_cfg_pair_records_the_conditional_half_like_a_conditional_call(sd):
    x_T, t = first_step_input(sd, [1, 2, 3], STEPS)
    cond = sd.encode(PROMPTS)
    pair = Condition.cat([sd.null_condition(3), cond])  # the sampler's order: [null, cond]
    with torch.no_grad(), recording_cross_attention(sd.network) as pair_maps:
        sd.eps(torch.cat([x_T, x_T]), t, pair)
    with torch.no_grad(), recording_cross_attention(sd.network) as cond_maps:
        sd.eps(x_T, t, cond)
    for in_pair, alone in zip(pair_maps, cond_maps, strict=True):
        assert in_pair.shape == (6, 77)
        torch.testing.assert_close(in_pair[3:], alone, rtol=0, atol=1e-6)


def test_processors_are_restored_when_the_block_raises(sd):
    before = _processors(sd.network)
    with pytest.raises(DiffmemError, match="x_t has batch"), recording_cross_attention(sd.network):
        sd.eps(torch.zeros(2, *sd.sample_shape), torch.tensor(981), sd.encode(PROMPTS))
    assert _processors(sd.network) == before


def test_entropy_of_hand_checked_distributions():
    distributions = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(token_entropy(distributions), torch.tensor([math.log(2), 0.0, math.log(4)]))


def test_keys_without_weights_attend_uniformly_at_entropy_log_77():
    denoiser = wrap_pipeline(tiny_stable_diffusion())
    for module in denoiser.network.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            torch.nn.init.zeros_(module.to_k.weight)
    result = attention_entropy(denoiser, PROMPTS, AttentionEntropyConfig(num_inference_steps=STEPS))
    torch.testing.assert_close(result.extras["per_layer"], torch.full((3, 4), math.log(77)))
    torch.testing.assert_close(result.scores, torch.full((3,), math.log(77)))


def test_attention_entropy_layers_batching_seeds_and_cost(sd):
    config = AttentionEntropyConfig(num_inference_steps=STEPS, n_generations=2)
    every = attention_entropy(sd, PROMPTS, config)
    small = attention_entropy(sd, PROMPTS, replace(config, batch_size=1))
    one = attention_entropy(sd, PROMPTS, replace(config, layers=(3,)))
    assert every.extras["per_layer"].shape == (3, CROSS_ATTENTION_LAYERS)
    assert (every.scores < math.log(77)).all()  # a random model still prefers some tokens
    torch.testing.assert_close(every.scores, every.extras["per_layer"].mean(dim=1))
    torch.testing.assert_close(one.scores, every.extras["per_layer"][:, 3])
    torch.testing.assert_close(small.extras["per_layer"], every.extras["per_layer"], rtol=0, atol=1e-5)
    assert torch.equal(every.seeds, torch.tensor(detection_seeds(0, [0, 1, 2], 2)).reshape(3, 2))
    assert every.unet_evaluations_per_prompt == 2  # the conditional prediction, once per generation
    with pytest.raises(DiffmemError, match=r"positions among the 4 cross-attention layers \(0..3\)"):
        attention_entropy(sd, PROMPTS, replace(config, layers=(4,)))


def test_attention_entropy_needs_cross_attention():
    with pytest.raises(DiffmemError, match="UNet2DModel has no diffusers attention processors"):
        attention_entropy(wrap_pipeline(tiny_unet2d(class_conditional=True)), [1, 2])


# --- generation agreement ----------------------------------------------------------------------------


def test_tiled_l2_is_zero_for_identical_images_and_the_rms_of_the_one_tile_that_differs():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[1, :, 4:8, 8:12] += 0.3 * torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1))
    distances = tiled_l2(a, b)
    assert distances.shape == (2, 2) and distances[0, 0] == 0
    tile_rms = (b[1, :, 4:8, 8:12] - a[1, :, 4:8, 8:12]).square().mean().sqrt()
    torch.testing.assert_close(distances[1, 1], tile_rms)
    assert (distances[0, 1] > tile_rms) and tiled_l2(a, a[:1]).shape == (2, 1)
    torch.testing.assert_close(tiled_l2(b, a), distances.T)
    with pytest.raises(DiffmemError, match="do not split into 3x3 equal tiles"):
        tiled_l2(a, b, tiles=3)


def test_nearest_sibling_skips_the_image_itself():
    images = torch.zeros(3, 3, 8, 8)
    images[2] += 0.5
    torch.testing.assert_close(nearest_sibling_distance(images), torch.tensor([0.0, 0.0, 0.5]))


AGREEMENT = GenerationAgreementConfig(num_inference_steps=3, n_generations=3, batch_size=4)


def test_identical_generations_score_higher(sd, monkeypatch):
    varied = generation_agreement(sd, PROMPTS, AGREEMENT)
    monkeypatch.setattr(sd, "decode", lambda x0: torch.full((x0.shape[0], 3, 16, 16), 0.5))
    identical = generation_agreement(sd, PROMPTS, AGREEMENT)
    assert (identical.scores == 0).all() and (identical.extras["near_duplicates"] == 3).all()
    assert (varied.scores < -AGREEMENT.duplicate_distance).all()
    assert (varied.extras["near_duplicates"] == 0).all()
    torch.testing.assert_close(varied.scores, -varied.extras["nearest_distance"].median(dim=1).values)


def test_generation_agreement_batching_seeds_and_cost(sd):
    large = generation_agreement(sd, PROMPTS, AGREEMENT, prompt_ids=[7, 8, 9])
    small = generation_agreement(sd, PROMPTS, replace(AGREEMENT, batch_size=1), prompt_ids=[7, 8, 9])
    torch.testing.assert_close(small.extras["nearest_distance"], large.extras["nearest_distance"])
    assert large.extras["nearest_distance"].shape == (3, 3)
    assert torch.equal(large.seeds, torch.tensor(detection_seeds(0, [7, 8, 9], 3)).reshape(3, 3))
    assert large.unet_evaluations_per_prompt == 2 * 3 * 3


def test_generation_agreement_bad_input(sd):
    with pytest.raises(DiffmemError, match="n_generations must be at least 2, got 1"):
        generation_agreement(sd, PROMPTS, replace(AGREEMENT, n_generations=1))
    with pytest.raises(DiffmemError, match="needs classifier-free guidance; got guidance_scale=1.0"):
        generation_agreement(sd, PROMPTS, replace(AGREEMENT, guidance_scale=1.0))


# --- one step ------------------------------------------------------------------------------------------


def test_one_step_is_the_distance_of_the_guided_estimate_from_the_start(sd):
    result = one_step(sd, PROMPTS, OneStepConfig(num_inference_steps=STEPS), prompt_ids=[4, 5, 6])
    for i, prompt in enumerate(PROMPTS):
        x_T, t = _x_T(sd, 4 + i)
        with torch.no_grad():
            eps_cond, eps_uncond = sd.eps(x_T, t, sd.encode([prompt])), sd.eps(x_T, t, sd.null_condition(1))
        eps = eps_uncond + 7.5 * (eps_cond - eps_uncond)
        alpha_bar = sd.scheduler.alphas_cumprod[int(t)]
        x0_hat = (x_T - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        expected = (x_T / alpha_bar.sqrt() - x0_hat).square().mean()
        torch.testing.assert_close(result.scores[i], expected, rtol=1e-4, atol=1e-6)
    assert result.unet_evaluations_per_prompt == 2


def test_one_step_generations_batching_and_bad_input(sd):
    config = OneStepConfig(num_inference_steps=STEPS, n_generations=2)
    large = one_step(sd, PROMPTS, config)
    small = one_step(sd, PROMPTS, replace(config, batch_size=1))
    torch.testing.assert_close(small.scores, large.scores, rtol=1e-4, atol=1e-6)
    assert large.seeds.shape == (3, 2) and large.unet_evaluations_per_prompt == 4
    with pytest.raises(DiffmemError, match="one_step needs classifier-free guidance; got guidance_scale=1.0"):
        one_step(sd, PROMPTS, replace(config, guidance_scale=1.0))

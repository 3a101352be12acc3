"""Transformer and flow-matching families behind the denoiser contract: the sampler reproduces each
pipeline's own output (CPU, float32), detection runs on them, and cross-attention methods refuse."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffmem.adapters import (
    FluxDenoiser,
    PixArtDenoiser,
    StableDiffusion3Denoiser,
    load_denoiser,
    wrap_pipeline,
)
from diffmem.detect.attention_entropy import AttentionEntropyConfig, attention_entropy
from diffmem.detect.first_step import first_step, first_step_input
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.detect.one_step import one_step
from diffmem.errors import DiffmemError
from diffmem.explain.attention_maps import word_attention_maps
from diffmem.explain.token_significance import token_significance
from diffmem.mitigate.bos_attention_scaling import BosAttentionScalingConfig, bos_attention_scaling
from diffmem.mitigate.mitigation import SamplingOptions
from diffmem.models.tiny import tiny_flux, tiny_pixart, tiny_stable_diffusion_3
from diffmem.sampling import sample

PROMPTS = ["a red sneaker at the top left", "a blue bag at the bottom right on a gray background"]
SEEDS = [3, 11]
TOLERANCE = 1e-5
T5_LENGTH = 64  # the T5 context of these tests: the tiny T5 tokenizer reads characters


@pytest.fixture(scope="module")
def sd3():
    pipe = tiny_stable_diffusion_3()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pixart():
    pipe = tiny_pixart()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_output(pipe, output_type, **settings):
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, generator=generators, output_type=output_type, **settings).images


@pytest.mark.parametrize("with_t5", [True, False])
def test_stable_diffusion_3_parity(sd3, with_t5):
    pipe = sd3 if with_t5 else tiny_stable_diffusion_3(with_t5=False)
    pipe.set_progress_bar_config(disable=True)
    denoiser = wrap_pipeline(pipe, max_sequence_length=T5_LENGTH)
    assert isinstance(denoiser, StableDiffusion3Denoiser) and denoiser.prediction_type == "flow_prediction"
    settings = {"num_inference_steps": 4, "guidance_scale": 7.0}
    latents = sample(denoiser, denoiser.encode(PROMPTS), SEEDS, **settings)
    with torch.no_grad():
        images = denoiser.decode(latents)
    call = {**settings, "max_sequence_length": T5_LENGTH}
    assert (latents - _pipeline_output(pipe, "latent", **call)).abs().max() <= TOLERANCE
    assert (images - _pipeline_output(pipe, "pt", **call)).abs().max() <= TOLERANCE


@pytest.mark.supports("detection", "stable-diffusion-3")
def test_stable_diffusion_3_first_step_score_is_the_velocity_difference(sd3):
    denoiser = wrap_pipeline(sd3, max_sequence_length=T5_LENGTH)
    prompts = [*PROMPTS, ""]
    config = NoiseNormConfig(num_inference_steps=4, guidance_scale=7.0)
    scores = noise_norm(denoiser, prompts, config).scores
    assert torch.isfinite(scores).all() and scores[0] > 0 and scores[1] > 0 and scores[0] != scores[1]
    assert scores[2] <= 1e-5 * scores[0]  # the empty prompt is the unconditional branch (up to rounding)

    # the same score, from the pipeline's own encoder and transformer at x_T (sigma = 1)
    seed = noise_norm(denoiser, prompts[:1], config).seeds[0, 0].item()
    x_T, t = first_step_input(denoiser, [seed], 4)
    assert t.item() == 1000.0
    embeds, negative, pooled, negative_pooled = sd3.encode_prompt(
        prompts[0], None, None, max_sequence_length=T5_LENGTH
    )
    with torch.no_grad():
        v_c, v_u = (
            sd3.transformer(x_T, timestep=t.expand(1), encoder_hidden_states=e, pooled_projections=p)[0]
            for e, p in ((embeds, pooled), (negative, negative_pooled))
        )
    d = v_c - v_u
    assert torch.allclose(scores[0], (d - d.mean(dim=(2, 3), keepdim=True)).norm(), rtol=1e-5)
    # at sigma = 1 the implied noise prediction is x_T for every prompt (alpha_bar = 0): only v carries it;
    # the clean estimate is x0 = x_t - sigma v of the guided velocity
    assert denoiser.alpha_bar(t) == 0
    step = first_step(denoiser, denoiser.encode(prompts[:1]), [seed], 4, guidance_scale=7.0)
    assert torch.allclose(step.x0_hat, x_T - (v_u + 7.0 * (v_c - v_u)), atol=1e-5)


def test_stable_diffusion_3_refuses_methods_it_cannot_support(sd3):
    denoiser = wrap_pipeline(sd3, max_sequence_length=T5_LENGTH)
    refused = {
        "attention_entropy": lambda: attention_entropy(denoiser, PROMPTS),
        "attention maps": lambda: word_attention_maps(denoiser, PROMPTS[0]),
        "bos_attention_scaling": lambda: bos_attention_scaling(
            denoiser, PROMPTS, SEEDS, BosAttentionScalingConfig(), SamplingOptions(num_inference_steps=2)
        ),
        "one_step": lambda: one_step(denoiser, PROMPTS),
    }
    for method, call in refused.items():
        with pytest.raises(DiffmemError, match=f"{method} does not support stable-diffusion-3") as error:
            call()
        assert "\n" not in str(error.value)
    with pytest.raises(DiffmemError, match="needs a flow-matching scheduler"):
        sample(denoiser, denoiser.encode(PROMPTS[:1]), SEEDS[:1], scheduler=DDIMScheduler())


def test_stable_diffusion_3_loads_from_a_directory(sd3, tmp_path):
    sd3.save_pretrained(tmp_path)
    denoiser = load_denoiser(tmp_path, max_sequence_length=T5_LENGTH)
    assert denoiser.family == "stable-diffusion-3" and len(denoiser.text_encoders) == 3
    loaded = denoiser.encode(PROMPTS)
    built = wrap_pipeline(sd3, max_sequence_length=T5_LENGTH).encode(PROMPTS)
    assert loaded["prompt_embeds"].shape[1] == 77 + T5_LENGTH
    assert torch.equal(loaded["prompt_embeds"], built["prompt_embeds"])


@pytest.mark.parametrize(
    ("sigma", "scheduler"), [(False, "dpm-solver++"), (False, "ddim"), (True, "dpm-solver++")]
)
def test_pixart_parity(pixart, sigma, scheduler):
    """The learned-sigma channels are dropped as the pipelines drop them; samples match bit for bit."""
    pipe = pixart if (sigma, scheduler) == (False, "dpm-solver++") else tiny_pixart(sigma, scheduler)
    pipe.set_progress_bar_config(disable=True)
    denoiser = wrap_pipeline(pipe, max_sequence_length=T5_LENGTH)
    assert isinstance(denoiser, PixArtDenoiser) and denoiser.family == (
        "pixart-sigma" if sigma else "pixart-alpha"
    )
    settings = {"num_inference_steps": 4, "guidance_scale": 4.5}
    latents = sample(denoiser, denoiser.encode(PROMPTS), SEEDS, **settings)
    with torch.no_grad():
        images = denoiser.decode(latents)
    call = {**settings, "max_sequence_length": T5_LENGTH, "use_resolution_binning": False}
    assert (latents - _pipeline_output(pipe, "latent", **call)).abs().max() <= TOLERANCE
    assert (images - _pipeline_output(pipe, "pt", **call)).abs().max() <= TOLERANCE


@pytest.mark.supports("detection", "pixart-alpha")
@pytest.mark.supports("explanation", "pixart-alpha", refused="T5 puts no start token")
def test_pixart_detection_and_methods(pixart):
    denoiser = wrap_pipeline(pixart, max_sequence_length=T5_LENGTH)
    prompts = [*PROMPTS, ""]
    scores = noise_norm(denoiser, prompts, NoiseNormConfig(num_inference_steps=4, guidance_scale=4.5)).scores
    assert torch.isfinite(scores).all() and scores[0] > 0 and scores[1] > 0 and scores[0] != scores[1]
    assert scores[2] <= 1e-5 * scores[0]
    # T5 cross-attention: entropy over the prompt's unmasked tokens (the empty prompt has only </s>)
    entropy = attention_entropy(denoiser, prompts, AttentionEntropyConfig(num_inference_steps=4)).scores
    assert torch.isfinite(entropy).all() and (entropy[:2] > 0).all() and entropy[2].abs() < 1e-4
    refused = {
        "attention maps": lambda: word_attention_maps(denoiser, PROMPTS[0]),
        "token significance": lambda: token_significance(denoiser, PROMPTS[0]),
        "bos_attention_scaling": lambda: bos_attention_scaling(
            denoiser, PROMPTS, SEEDS, BosAttentionScalingConfig(), SamplingOptions(num_inference_steps=2)
        ),
    }
    for method, call in refused.items():
        with pytest.raises(DiffmemError, match=f"{method} does not support pixart-alpha: .* no start"):
            call()


@pytest.mark.parametrize(("distilled", "true_cfg"), [(True, 1.0), (True, 4.0), (False, 1.0)])
def test_flux_parity(flux, distilled, true_cfg):
    """Flux-dev's normal path (guidance embedded, one pass), its true-CFG path with the empty negative
    prompt, and Flux-schnell; the pipeline's packed latents are unpacked to compare."""
    pipe = flux if distilled else tiny_flux(guidance_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    denoiser = wrap_pipeline(pipe, max_sequence_length=T5_LENGTH, resolution=(16, 16), embedded_guidance=3.5)
    assert isinstance(denoiser, FluxDenoiser) and denoiser.family == (
        "flux-dev" if distilled else "flux-schnell"
    )
    latents = sample(
        denoiser, denoiser.encode(PROMPTS), SEEDS, num_inference_steps=4, guidance_scale=true_cfg
    )
    with torch.no_grad():
        images = denoiser.decode(latents)
    call = {
        "num_inference_steps": 4,
        "guidance_scale": 3.5,
        "true_cfg_scale": true_cfg,
        "height": 16,
        "width": 16,
    }
    call |= {"max_sequence_length": T5_LENGTH, "negative_prompt": "" if true_cfg > 1 else None}
    packed = _pipeline_output(pipe, "latent", **call)
    assert (latents - pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)).abs().max() <= TOLERANCE
    assert (images - _pipeline_output(pipe, "pt", **call)).abs().max() <= TOLERANCE


@pytest.mark.supports("detection", "flux-dev")
@pytest.mark.supports("explanation", "flux-dev", refused="T5 puts no start token")
def test_flux_detection_and_refusals(flux):
    denoiser = wrap_pipeline(flux, max_sequence_length=T5_LENGTH, resolution=(16, 16))
    prompts = [*PROMPTS, ""]
    config = NoiseNormConfig(num_inference_steps=4, guidance_scale=4.0)  # the true-CFG path
    scores = noise_norm(denoiser, prompts, config).scores
    assert torch.isfinite(scores).all() and scores[0] > 0 and scores[1] > 0 and scores[0] != scores[1]
    assert scores[2] <= 1e-5 * scores[0]
    # the embedded (distilled) guidance is an input of both passes: it changes the score
    other = wrap_pipeline(flux, max_sequence_length=T5_LENGTH, resolution=(16, 16), embedded_guidance=7.0)
    assert noise_norm(other, prompts[:1], config).scores != scores[0]
    refused = {
        "attention_entropy": lambda: attention_entropy(denoiser, PROMPTS),
        "attention maps": lambda: word_attention_maps(denoiser, PROMPTS[0], config=None),
        "token significance": lambda: token_significance(denoiser, PROMPTS[0]),
        "one_step": lambda: one_step(denoiser, PROMPTS),
    }
    for method, call in refused.items():
        with pytest.raises(DiffmemError, match=f"{method} does not support flux-dev"):
            call()

"""Each method on the families its own tests do not cover, on tiny random-weight pipelines: it gives a
meaningful result (finite, prompt-dependent scores; a lowered norm or similarity) or refuses in one line
naming the family and the reason. The ``supports`` marks make these cells of the support matrix."""

import pytest
import torch

from diffmem.adapters import wrap_pipeline
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.errors import DiffmemError
from diffmem.explain.token_significance import SignificanceConfig, token_significance
from diffmem.index import TrainingSetIndex
from diffmem.mitigate import ReferenceSet, SamplingOptions, mitigated_generate, mitigation_config
from diffmem.mitigate.prompt_optimization import PromptOptimizationConfig
from diffmem.mitigate.training_similarity import training_similarity
from diffmem.models.tiny import (
    tiny_flux,
    tiny_pixart,
    tiny_stable_diffusion_3,
    tiny_stable_diffusion_xl,
    tiny_unet2d,
)
from diffmem.sampling import generate
from diffmem.train.fine_tune import fine_tune

PROMPTS = ["a red sneaker at the top left", "a blue bag at the bottom right on a gray background"]
T5_LENGTH = 64  # the T5 context of these tests: the tiny T5 tokenizer reads characters
GUIDANCE = 4.0  # above 1 for every family (Flux samples its true-CFG path)
BUILDERS = {
    "stable-diffusion-xl": tiny_stable_diffusion_xl,
    "stable-diffusion-3": tiny_stable_diffusion_3,
    "pixart-alpha": tiny_pixart,
    "pixart-sigma": lambda: tiny_pixart(sigma=True),
    "flux-dev": tiny_flux,
    "flux-schnell": lambda: tiny_flux(guidance_distilled=False),
}


def _denoiser(family: str):
    """The family's tiny pipeline as a denoiser, at the tests' T5 context and Flux's 16-pixel size."""
    options = {} if family == "stable-diffusion-xl" else {"max_sequence_length": T5_LENGTH}
    if family.startswith("flux"):
        options["resolution"] = (16, 16)
    denoiser = wrap_pipeline(BUILDERS[family](), **options)
    assert denoiser.family == family
    return denoiser


def _refusal(call, *names: str) -> str:
    """The one-line message of the ``DiffmemError`` that ``call`` raises, checked to name each of ``names``."""
    with pytest.raises(DiffmemError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in names), message
    return message


@pytest.mark.supports("detection", "pixart-sigma", "flux-schnell")
@pytest.mark.parametrize("family", ["pixart-sigma", "flux-schnell"])
def test_noise_norm_scores_each_prompt_and_the_empty_prompt_zero(family):
    scores = noise_norm(
        _denoiser(family), [*PROMPTS, ""], NoiseNormConfig(num_inference_steps=4, guidance_scale=GUIDANCE)
    ).scores
    assert torch.isfinite(scores).all() and (scores[:2] > 0).all() and scores[0] != scores[1]
    assert scores[2] <= 1e-5 * scores[0]


@pytest.mark.supports("detection", "unet2d")
def test_noise_norm_scores_the_classes_of_a_class_conditional_unet2d():
    denoiser = wrap_pipeline(tiny_unet2d(class_conditional=True))
    config = NoiseNormConfig(num_inference_steps=3, guidance_scale=2.0)
    scores = noise_norm(denoiser, [1, 2], config).scores
    assert torch.isfinite(scores).all() and (scores > 0).all() and scores[0] != scores[1]
    _refusal(lambda: noise_norm(wrap_pipeline(tiny_unet2d()), [None], config), "unconditional")


@pytest.mark.supports("explanation", "stable-diffusion-3")
def test_token_significance_on_sd3_scores_every_word_on_the_clip_positions():
    denoiser = _denoiser("stable-diffusion-3")
    config = SignificanceConfig(num_inference_steps=4)
    results = [token_significance(denoiser, prompt, config) for prompt in PROMPTS]
    for prompt, result in zip(PROMPTS, results):
        scores = torch.tensor(result.word_scores)
        assert len(scores) == len(prompt.split()) and torch.isfinite(scores).all() and (scores > 0).all()
        assert len(set(result.word_scores)) > 1
    assert results[0].score != results[1].score


@pytest.mark.supports("explanation", "pixart-sigma", "flux-schnell", refused="T5 puts no start token")
@pytest.mark.parametrize("family", ["pixart-sigma", "flux-schnell"])
def test_token_significance_refuses_t5_sequences(family):
    _refusal(lambda: token_significance(_denoiser(family), PROMPTS[0]), family, "no start (BOS) token")


@pytest.mark.supports("explanation", "unet2d", refused="no text encoder")
def test_token_significance_refuses_a_model_without_text():
    denoiser = wrap_pipeline(tiny_unet2d(class_conditional=True))
    _refusal(lambda: token_significance(denoiser, "a cat"), "unet2d", "text-conditioned")


@pytest.mark.supports(
    "prompt-optimisation",
    "stable-diffusion-xl",
    "stable-diffusion-3",
    "pixart-alpha",
    "pixart-sigma",
    "flux-dev",
    "flux-schnell",
)
@pytest.mark.parametrize("family", list(BUILDERS))
def test_prompt_optimisation_lowers_the_first_step_norm(family):
    result = mitigated_generate(
        _denoiser(family),
        PROMPTS[:1],
        "prompt_optimization",
        PromptOptimizationConfig(target=0.0, max_iterations=2),
        sampling=SamplingOptions(num_inference_steps=2, guidance_scale=GUIDANCE),
    )
    initial, final = result.extras["initial_norm"][0], result.extras["final_norm"][0]
    assert result.extras["optimization_iterations"] == [2] and 0 < final < initial
    assert result.latents.isfinite().all()


@pytest.mark.supports(
    "amg",
    "stable-diffusion-xl",
    "pixart-alpha",
    "pixart-sigma",
    "stable-diffusion-3",
    "flux-dev",
    "flux-schnell",
)
@pytest.mark.parametrize("family", list(BUILDERS))
def test_amg_moves_generations_away_from_the_training_set(family):
    """The plain generations are in the 'training set' (nL2 = 0); AMG's are farther from it (flow models:
    guided through their implied noise prediction, with no dissimilarity step at x_T, so three steps)."""
    denoiser = _denoiser(family)
    plain = generate(denoiser, PROMPTS, num_inference_steps=3, guidance_scale=GUIDANCE).images
    noise = torch.rand((30, *plain.shape[1:]), generator=torch.Generator().manual_seed(2))
    reference = ReferenceSet(TrainingSetIndex.build_pixels(torch.cat([plain, noise]), ["a"] * 32))
    config = mitigation_config("amg", reference=reference, gate="always", c3=2000.0)
    sampling = SamplingOptions(num_inference_steps=3, guidance_scale=GUIDANCE)
    result = mitigated_generate(denoiser, PROMPTS, "amg", config, sampling=sampling)
    assert result.guided_steps == [3, 3] and result.status == ["ok", "ok"]
    with torch.no_grad():
        before, _ = training_similarity(plain, reference)
        after, _ = training_similarity(result.images, reference)
    assert (before > -1e-6).all() and torch.isfinite(after).all() and (after < before - 0.1).all()


@pytest.mark.supports(
    "fine-tuning",
    "pixart-alpha",
    "pixart-sigma",
    "flux-dev",
    "flux-schnell",
    refused="a transformer other than SD3's MMDiT",
)
@pytest.mark.parametrize(
    "family", [f for f in BUILDERS if f not in ("stable-diffusion-xl", "stable-diffusion-3")]
)
def test_fine_tuning_refuses_pipelines_it_cannot_train(family, tmp_path):
    """Refused when the pipeline is opened: before any training data is read."""
    pipeline = BUILDERS[family]()
    pipeline.save_pretrained(tmp_path / "model")
    named = type(pipeline).__name__
    _refusal(
        lambda: fine_tune(tmp_path / "model", tmp_path / "data", tmp_path / "run", progress=False), named
    )

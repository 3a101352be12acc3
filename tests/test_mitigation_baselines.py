"""Peer inference-time mitigations (SPEC §7): Somepalli et al.'s prompt perturbations, Jain et al.'s
transition point, Ren et al.'s BOS attention scaling, on tiny random-weight pipelines."""

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from diffmem.adapters import wrap_pipeline
from diffmem.core.condition import Condition
from diffmem.core.denoiser import Prediction
from diffmem.errors import DiffmemError
from diffmem.mitigate.bos_attention_scaling import (
    BosAttentionScalingConfig,
    BosScaledCrossAttention,
    bos_attention_scaling,
    scaled_bos_attention,
)
from diffmem.mitigate.mitigation import NoMitigationConfig, SamplingOptions, no_mitigation
from diffmem.mitigate.prompt_perturbation import (
    CaptionWordRepetitionConfig,
    GaussianNoiseInjectionConfig,
    RandomNumberConfig,
    RandomTokenConfig,
    caption_word_repetition,
    gaussian_noise_injection,
    random_number,
    random_token,
)
from diffmem.mitigate.registry import mitigation_config
from diffmem.mitigate.transition_point import (
    DynamicTransition,
    DynamicTransitionConfig,
    StaticTransitionConfig,
    dynamic_transition_point,
    static_transition_point,
)
from diffmem.models.tiny import tiny_stable_diffusion_xl, tiny_unet2d
from diffmem.sampling import StepState, sample

PROMPTS = ["a red sneaker at the top left", "a blue bag on a gray background", "three green hats"]
SEEDS = [11, 12, 13]
STEPS = 4  # DDIM timesteps 751, 501, 251, 1
SAMPLING = SamplingOptions(num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def class_model():
    return wrap_pipeline(tiny_unet2d(class_conditional=True))


def _plain(denoiser, prompts=PROMPTS, seeds=SEEDS, sampling=SAMPLING):
    return no_mitigation(denoiser, prompts, seeds, NoMitigationConfig(), sampling).latents


def _check_record(result, denoiser, count, steps=STEPS):
    """The shapes every Mitigated has."""
    assert result.latents.shape == (count, *denoiser.sample_shape)
    assert len(result.prompts_used) == len(result.guided_steps) == len(result.status) == count
    assert result.status == ["ok"] * count
    assert result.unet_evaluations == 2 * count * steps


# --- Somepalli et al.: GNI ------------------------------------------------------------------------------


def test_gni_with_zero_std_is_plain_sampling(sd):
    result = gaussian_noise_injection(sd, PROMPTS, SEEDS, GaussianNoiseInjectionConfig(std=0.0), SAMPLING)
    _check_record(result, sd, len(PROMPTS))
    assert torch.equal(result.latents, _plain(sd))
    assert result.prompts_used == PROMPTS and result.guided_steps == [0, 0, 0]


def test_gni_noise_comes_from_each_samples_seed(sd):
    config = GaussianNoiseInjectionConfig()
    prompts = [PROMPTS[0]] * 3
    result = gaussian_noise_injection(sd, prompts, [5, 5, 6], config, SAMPLING)
    alone = gaussian_noise_injection(sd, prompts[:1], [6], config, SAMPLING)
    plain = _plain(sd, prompts, [5, 5, 6])
    # same seed, same noise: equal up to the float rounding of their batch positions (see sampling/seeds.py)
    torch.testing.assert_close(result.latents[0], result.latents[1], rtol=1e-4, atol=1e-4)
    assert (result.latents[0] - result.latents[2]).abs().max() > 1.0  # another seed, other noise
    torch.testing.assert_close(result.latents[2], alone.latents[0], rtol=1e-4, atol=1e-4)  # batch-mates
    assert (result.latents - plain).flatten(1).abs().amax(dim=1).min() > 1e-4
    assert result.prompts_used == prompts and result.guided_steps == [STEPS] * 3


def test_gni_noise_scales_with_std(sd):
    plain = _plain(sd, PROMPTS[:1], SEEDS[:1])
    small, large = (
        gaussian_noise_injection(sd, PROMPTS[:1], SEEDS[:1], GaussianNoiseInjectionConfig(std), SAMPLING)
        for std in (0.01, 1.0)
    )
    assert 0 < (small.latents - plain).norm() < (large.latents - plain).norm()


# --- Somepalli et al.: RT, CWR, RNA -----------------------------------------------------------------------

TEXT_METHODS = [
    (random_token, RandomTokenConfig),
    (caption_word_repetition, CaptionWordRepetitionConfig),
    (random_number, RandomNumberConfig),
]


def _without_one_word(used: str, prompt: str, word: str) -> bool:
    """``used`` is ``prompt`` with ``word`` inserted at one word boundary."""
    words = used.split(" ")
    return len(words) == len(prompt.split(" ")) + 1 and any(
        words[i] == word and words[:i] + words[i + 1 :] == prompt.split(" ") for i in range(len(words))
    )


@pytest.mark.parametrize(("method", "config_class"), TEXT_METHODS)
def test_text_perturbation_inserts_one_word_and_samples_the_new_prompt(sd, method, config_class):
    result = method(sd, PROMPTS, SEEDS, config_class(), SAMPLING)
    _check_record(result, sd, len(PROMPTS))
    for prompt, used, words in zip(PROMPTS, result.prompts_used, result.extras["inserted"]):
        assert len(words) == 1 and _without_one_word(used, prompt, words[0])
    assert torch.equal(result.latents, _plain(sd, result.prompts_used))
    assert result.guided_steps == [STEPS] * len(PROMPTS)


@pytest.mark.parametrize(("method", "config_class"), TEXT_METHODS)
def test_text_perturbation_is_deterministic_per_seed_and_differs_across_seeds(sd, method, config_class):
    seeds = list(range(8))
    prompts = [PROMPTS[0]] * len(seeds)
    sampling = SamplingOptions(num_inference_steps=1)
    first = method(sd, prompts, seeds, config_class(), sampling)
    again = method(sd, prompts[::-1], seeds[::-1], config_class(), sampling)
    assert again.prompts_used == first.prompts_used[::-1]  # a sample's text depends on its seed alone
    assert torch.allclose(again.latents.flip(0), first.latents, atol=1e-4)
    assert len(set(first.prompts_used)) > len(seeds) // 2


def test_each_text_method_inserts_what_its_paper_says(sd):
    prompt_words = PROMPTS[1].split(" ")
    tokenizer = sd.pipeline.tokenizer
    seeds = list(range(6))
    prompts = [PROMPTS[1]] * len(seeds)
    sampling = SamplingOptions(num_inference_steps=1)
    for words in caption_word_repetition(sd, prompts, seeds, CaptionWordRepetitionConfig(), sampling).extras[
        "inserted"
    ]:
        assert words[0] in prompt_words
    for words in random_number(sd, prompts, seeds, RandomNumberConfig(), sampling).extras["inserted"]:
        assert words[0].isdigit() and 0 <= int(words[0]) < 100_000
    for words in random_token(sd, prompts, seeds, RandomTokenConfig(), sampling).extras["inserted"]:
        ids = tokenizer(words[0], add_special_tokens=False)["input_ids"]
        assert words[0].strip() == words[0] != "" and tokenizer.decode(ids) == words[0].lower()


def test_several_insertions(sd):
    result = random_number(sd, PROMPTS, SEEDS, RandomNumberConfig(insertions=3), SAMPLING)
    for prompt, used, words in zip(PROMPTS, result.prompts_used, result.extras["inserted"]):
        assert len(words) == 3 and len(used.split(" ")) == len(prompt.split(" ")) + 3
        remaining = used.split(" ")
        for word in words:
            remaining.remove(word)
        assert remaining == prompt.split(" ")


def test_prompt_perturbation_errors(sd, class_model):
    with pytest.raises(DiffmemError, match="std must be a non-negative number"):
        GaussianNoiseInjectionConfig(std=-0.1)
    with pytest.raises(DiffmemError, match="std must be a non-negative number"):
        GaussianNoiseInjectionConfig(std=math.nan)
    for config_class in (RandomTokenConfig, CaptionWordRepetitionConfig, RandomNumberConfig):
        with pytest.raises(DiffmemError, match="insertions must be at least 1"):
            config_class(insertions=0)
    with pytest.raises(DiffmemError, match="max_number must be at least 1"):
        RandomNumberConfig(max_number=0)
    for method, config_class in TEXT_METHODS:
        with pytest.raises(DiffmemError, match="needs a text-conditioned model"):
            method(class_model, [1, 2], [0, 1], config_class(), SAMPLING)
    with pytest.raises(DiffmemError, match="needs a text-conditioned model"):
        gaussian_noise_injection(class_model, [1, 2], [0, 1], GaussianNoiseInjectionConfig(), SAMPLING)
    with pytest.raises(DiffmemError, match="got 2 seeds for 3 prompts"):
        random_token(sd, PROMPTS, SEEDS[:2], RandomTokenConfig(), SAMPLING)


# --- Jain et al.: transition point ------------------------------------------------------------------------


def test_transition_at_the_first_step_is_plain_sampling(sd):
    config = StaticTransitionConfig(transition_timestep=999)
    result = static_transition_point(sd, PROMPTS, SEEDS, config, SAMPLING)
    _check_record(result, sd, len(PROMPTS))
    assert torch.equal(result.latents, _plain(sd))
    assert result.guided_steps == [0, 0, 0] and result.extras["transition_step"] == [0, 0, 0]
    assert result.extras["transition_t"] == [751.0] * 3


def test_transition_never_reached_is_unconditional_sampling(sd):
    result = static_transition_point(
        sd, PROMPTS, SEEDS, StaticTransitionConfig(transition_timestep=0), SAMPLING
    )
    unguided = sample(sd, sd.encode(PROMPTS), SEEDS, num_inference_steps=STEPS, guidance_scale=0.0)
    assert torch.allclose(result.latents, unguided, atol=1e-5)
    assert (result.latents - _plain(sd)).abs().max() > 1e-3
    assert result.guided_steps == [STEPS] * 3 and result.extras["transition_step"] == [None] * 3


def test_static_transition_at_t_500(sd):
    result = static_transition_point(sd, PROMPTS, SEEDS, StaticTransitionConfig(), SAMPLING)
    assert result.extras["transition_step"] == [2] * 3 and result.extras["transition_t"] == [251.0] * 3
    assert result.guided_steps == [2] * 3  # t = 751 and 501 unguided
    unguided = sample(sd, sd.encode(PROMPTS), SEEDS, num_inference_steps=STEPS, guidance_scale=0.0)
    for other in (_plain(sd), unguided):
        assert (result.latents - other).abs().max() > 1e-4


def _step(index: int, difference: torch.Tensor, scale: float = 7.5) -> StepState:
    """A step whose eps_cond - eps_uncond is ``difference`` ([B, C, H, W]), eps_uncond = 0."""
    zeros = torch.zeros_like(difference)
    batch = Condition({}, difference.shape[0])
    return StepState(
        index=index,
        num_steps=8,
        t=torch.tensor(900 - 100 * index),
        alpha_bar_t=torch.tensor(0.5),
        x_t=zeros,
        eps_cond=difference,
        eps_uncond=zeros,
        eps=scale * difference,
        x0_hat=zeros,
        cond=batch,
        null=batch,
        guidance_scale=scale,
        seeds=tuple(range(difference.shape[0])),
    )


def test_dynamic_transition_is_one_step_after_the_first_strict_local_minimum():
    norms = [
        [5.0, 4.0, 3.0, 3.5, 2.0, 2.5],  # minimum at step 2: guided from step 3 on
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.5],  # no minimum: never guided
        [3.0, 2.0, 2.0, 4.0, 1.0, 2.0],  # the plateau 2, 2 is no strict minimum; 1 at step 4 is
    ]
    expected = [3, None, 5]
    term = DynamicTransition(3, DynamicTransitionConfig())
    direction = torch.ones(1, 1, 2, 2) / 2  # unit norm
    for index in range(6):
        difference = torch.cat([n[index] * direction for n in norms])
        correction = term(_step(index, difference))
        for row, transition in enumerate(expected):
            guided = transition is not None and index >= transition
            # before its transition a sample runs at scale 1: eps_uncond + d = eps + (1 - 7.5) d
            want = torch.zeros_like(difference[row]) if guided else (1.0 - 7.5) * difference[row]
            assert torch.allclose(correction[row], want)
    assert term.transition_step == expected
    assert term.transition_t == [600.0, None, 400.0]
    assert term.changed_steps == [3, 6, 5]


class _Dipped:
    """A denoiser whose predictions shrink at one timestep, so ``||d_t||`` has a local minimum there (the
    random-weight model's norm falls monotonically)."""

    def __init__(self, denoiser, t_dip: int) -> None:
        self._denoiser = denoiser
        self._t_dip = t_dip

    def __getattr__(self, name: str) -> object:
        return getattr(self._denoiser, name)

    def predict(self, x_t, t, cond):
        prediction = self._denoiser.predict(x_t, t, cond)
        return Prediction(eps=prediction.eps * (0.3 if int(t) == self._t_dip else 1.0))


def test_dynamic_transition_matches_the_scale_1_trajectory(sd):
    steps, seeds = 6, [0, 1, 2, 3]  # DDIM timesteps 831, 665, 499, 333, 167, 1
    prompts = [PROMPTS[i % 3] for i in range(len(seeds))]
    dipped = _Dipped(sd, t_dip=499)
    norms = []
    record = lambda step: norms.append((step.eps_cond - step.eps_uncond).flatten(1).norm(dim=1))
    sample(
        dipped, sd.encode(prompts), seeds, num_inference_steps=steps, guidance_scale=1.0, observers=[record]
    )
    expected = []
    for m in torch.stack(norms, dim=1).tolist():  # [B, steps] on the scale-1 trajectory
        expected.append(next((j for j in range(2, steps) if m[j - 2] > m[j - 1] < m[j]), None))
    assert expected == [3] * len(seeds)
    sampling = SamplingOptions(num_inference_steps=steps)
    result = dynamic_transition_point(dipped, prompts, seeds, DynamicTransitionConfig(), sampling)
    assert result.extras["transition_step"] == expected and result.extras["transition_t"] == [333.0] * 4
    assert result.guided_steps == [3] * len(seeds)
    plain = dynamic_transition_point(sd, prompts, seeds, DynamicTransitionConfig(), sampling)
    assert plain.extras["transition_step"] == [None] * 4  # the plain model's norm has no minimum


def test_dynamic_transition_at_the_samplers_scale_is_plain_sampling(sd):
    config = DynamicTransitionConfig(scale_before=7.5)
    result = dynamic_transition_point(sd, PROMPTS, SEEDS, config, SAMPLING)
    assert torch.equal(result.latents, _plain(sd)) and result.guided_steps == [0, 0, 0]


def test_transition_point_errors():
    with pytest.raises(DiffmemError, match="transition_timestep must be a non-negative timestep"):
        StaticTransitionConfig(transition_timestep=-1)
    with pytest.raises(DiffmemError, match="scale_before must be a finite guidance scale"):
        StaticTransitionConfig(scale_before=math.inf)
    with pytest.raises(DiffmemError, match="scale_before must be a finite guidance scale"):
        DynamicTransitionConfig(scale_before=math.nan)
    unconditional = wrap_pipeline(tiny_unet2d())
    with pytest.raises(DiffmemError, match="unconditional"):
        static_transition_point(unconditional, [None], [0], StaticTransitionConfig(), SAMPLING)


# --- Ren et al.: BOS attention scaling --------------------------------------------------------------------


def test_bos_scale_1_is_plain_sampling(sd):
    result = bos_attention_scaling(sd, PROMPTS, SEEDS, BosAttentionScalingConfig(scale=1.0), SAMPLING)
    _check_record(result, sd, len(PROMPTS))
    assert torch.equal(result.latents, _plain(sd)) and result.guided_steps == [0, 0, 0]


def test_bos_scaling_changes_only_the_conditional_branch_and_restores_processors(sd):
    before = sd.network.attn_processors
    assert {type(p) for p in before.values()} == {AttnProcessor2_0}  # the model's SDPA attention
    steps = []
    first = lambda step: steps.append(step) if step.index == 0 else None
    sample(sd, sd.encode(PROMPTS), SEEDS, num_inference_steps=1, observers=[first])
    with scaled_bos_attention(sd.network, 1.25):
        sample(sd, sd.encode(PROMPTS), SEEDS, num_inference_steps=1, observers=[first])
    plain, scaled = steps
    assert torch.equal(plain.eps_uncond, scaled.eps_uncond)
    assert (plain.eps_cond - scaled.eps_cond).flatten(1).abs().amax(dim=1).min() > 1e-5
    result = bos_attention_scaling(sd, PROMPTS, SEEDS, BosAttentionScalingConfig(), SAMPLING)
    assert (result.latents - _plain(sd)).abs().max() > 1e-4 and result.guided_steps == [STEPS] * 3
    after = sd.network.attn_processors
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


def test_the_padding_mask_attends_to_each_prompts_tokens_only():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    hidden, keys, lengths = torch.randn(2, 5, 8), torch.randn(2, 7, 6), [3, 5]  # [unconditional, conditional]
    masked = BosScaledCrossAttention(AttnProcessor2_0(), scale=1.0, key_lengths=lengths)(attn, hidden, keys)
    for row, length in enumerate(lengths):
        alone = AttnProcessor2_0()(attn, hidden[row : row + 1], keys[row : row + 1, :length])
        torch.testing.assert_close(masked[row : row + 1], alone)
    with pytest.raises(DiffmemError, match="the padding mask has 2 rows; the attention batch has 4"):
        BosScaledCrossAttention(AttnProcessor2_0(), 1.0, lengths)(
            attn, hidden.repeat(2, 1, 1), keys.repeat(2, 1, 1)
        )


def test_bos_scaling_with_the_reference_padding_mask(sd):
    config = mitigation_config("bos_scaling", scale=1.0, mask_padding=True)
    result = bos_attention_scaling(sd, PROMPTS, SEEDS, config, SAMPLING)
    assert (result.latents - _plain(sd)).abs().max() > 1e-4 and result.guided_steps == [STEPS] * 3


def test_bos_processors_are_restored_after_an_error(sd):
    before = sd.network.attn_processors
    with pytest.raises(RuntimeError, match="inside"), scaled_bos_attention(sd.network, 2.0):
        assert any(isinstance(p, BosScaledCrossAttention) for p in sd.network.attn_processors.values())
        raise RuntimeError("inside")
    after = sd.network.attn_processors
    assert all(before[k] is after[k] for k in before)


@pytest.mark.parametrize("processor", [AttnProcessor2_0(), AttnProcessor()])
def test_bos_scaling_multiplies_the_conditional_bos_logit(processor):
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    hidden, text = torch.randn(4, 5, 8), torch.randn(4, 3, 6)  # [null, null, cond, cond]
    scale = 1.25
    with torch.no_grad():
        out = BosScaledCrossAttention(processor, scale)(attn, hidden, text)
        split = lambda x: x.unflatten(-1, (2, 4)).transpose(1, 2)
        q, k, v = split(attn.to_q(hidden)), split(attn.to_k(text)), split(attn.to_v(text))
        logits = q @ k.transpose(-1, -2) / 2.0  # 1 / sqrt(d), d = 4
        logits[2:, :, :, 0] *= scale  # Ren et al.: attn_weight[cond, :, :, 0] * c1
        want = attn.to_out[0]((logits.softmax(-1) @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(out, want, atol=1e-6)


def test_bos_scaling_on_sdxl():
    sdxl = wrap_pipeline(tiny_stable_diffusion_xl())
    sampling = SamplingOptions(num_inference_steps=2)
    plain = _plain(sdxl, PROMPTS[:2], SEEDS[:2], sampling)
    same = bos_attention_scaling(sdxl, PROMPTS[:2], SEEDS[:2], BosAttentionScalingConfig(scale=1.0), sampling)
    scaled = bos_attention_scaling(sdxl, PROMPTS[:2], SEEDS[:2], BosAttentionScalingConfig(), sampling)
    assert torch.equal(same.latents, plain) and (scaled.latents - plain).abs().max() > 1e-5


def test_bos_scaling_errors(class_model):
    for scale in (0.0, -1.25, math.nan, math.inf):
        with pytest.raises(DiffmemError, match="scale must be a positive number"):
            BosAttentionScalingConfig(scale=scale)
    with pytest.raises(DiffmemError, match="needs a text-conditioned model"):
        bos_attention_scaling(class_model, [1], [0], BosAttentionScalingConfig(), SAMPLING)
    with (
        pytest.raises(DiffmemError, match="UNet2DModel has no diffusers attention processors"),
        scaled_bos_attention(class_model.network, 1.25),
    ):
        pass
    no_attention = UNet2DConditionModel(
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=4,
    )
    with (
        pytest.raises(DiffmemError, match="needs cross-attention; UNet2DConditionModel has none"),
        scaled_bos_attention(no_attention, 1.25),
    ):
        pass

"""Invariants of the guided sampler: guidance terms, observers, gradients, seeding, checks."""

import pytest
import torch

from diffmem.adapters import wrap_pipeline
from diffmem.core.denoiser import x0_from_eps
from diffmem.errors import DiffmemError
from diffmem.models.tiny import tiny_unet2d
from diffmem.sampling import StepState, sample
from diffmem.sampling.schedulers import scheduler_like

PROMPTS = ["a red sneaker", "a blue bag on a gray background", "three green hats"]
SEEDS = [1, 2, 3]
STEPS = 4


def _sample(denoiser, prompts=PROMPTS, seeds=SEEDS, **kwargs):
    return sample(denoiser, denoiser.encode(prompts), seeds, num_inference_steps=STEPS, **kwargs)


class Recorder:
    def __init__(self):
        self.steps: list[StepState] = []

    def __call__(self, step: StepState) -> None:
        self.steps.append(step)


def test_zero_guidance_term_is_identity(sd):
    plain = _sample(sd)
    guided = _sample(sd, guidance=[lambda step: torch.zeros_like(step.eps)])
    assert torch.equal(plain, guided)


def test_guidance_term_changes_the_sample(sd):
    plain = _sample(sd)
    guided = _sample(sd, guidance=[lambda step: 0.5 * torch.ones_like(step.eps)])
    assert (plain - guided).abs().max() > 1e-3


def test_observer_sees_every_step_with_consistent_tensors(sd):
    recorder = Recorder()
    _sample(sd, observers=[recorder], guidance_scale=6.0)
    assert [s.index for s in recorder.steps] == list(range(STEPS))
    timesteps = [int(s.t) for s in recorder.steps]
    assert timesteps == sorted(timesteps, reverse=True)
    for step in recorder.steps:
        assert step.eps_cond.shape == (len(PROMPTS), *sd.sample_shape)
        assert not torch.allclose(step.eps_cond, step.eps_uncond)
        assert torch.allclose(step.eps, step.eps_uncond + 6.0 * (step.eps_cond - step.eps_uncond))
        assert torch.allclose(step.x0_hat, x0_from_eps(step.x_t, step.eps, step.alpha_bar_t))
        assert torch.isclose(step.alpha_bar_t, sd.scheduler.alphas_cumprod[int(step.t)])
        assert step.seeds == tuple(SEEDS) and step.guidance_scale == 6.0
        assert step.cond.prompts == tuple(PROMPTS) and step.null.prompts == ("",) * len(PROMPTS)
        assert not step.x_t.requires_grad


def test_first_step_starts_from_seeded_noise(sd):
    recorder = Recorder()
    _sample(sd, observers=[recorder])
    generator = torch.Generator().manual_seed(SEEDS[1])
    x_T = torch.randn((1, *sd.sample_shape), generator=generator)
    assert torch.equal(recorder.steps[0].x_t[1:2], x_T)


def test_samples_do_not_depend_on_batch_composition(sd):
    together = _sample(sd)
    alone = torch.cat([_sample(sd, [p], [s]) for p, s in zip(PROMPTS, SEEDS)])
    reordered = _sample(sd, PROMPTS[::-1], SEEDS[::-1]).flip(0)
    # equal up to float32 differences between batched and single matrix products
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together, reordered, rtol=1e-4, atol=1e-4)


def test_ancestral_noise_is_seeded_per_sample():
    """DDPM draws fresh noise every step; each sample's draws come from its own seed."""
    denoiser = wrap_pipeline(tiny_unet2d(scheduler="ddpm"))
    together = sample(denoiser, denoiser.encode([None] * 3), [5, 6, 7], num_inference_steps=STEPS)
    alone = sample(denoiser, denoiser.encode([None]), [6], num_inference_steps=STEPS)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-4)


def test_gradient_with_respect_to_x_t(sd):
    """A term with needs_grad differentiates through the model; the sampler stays gradient-free."""

    class PushAwayFromZero:
        needs_grad = True

        def __init__(self):
            self.norms: list[float] = []

        def __call__(self, step):
            (grad,) = torch.autograd.grad(step.x0_hat.square().sum(), step.x_t)
            self.norms.append(float(grad.norm()))
            return -0.01 * grad

    term = PushAwayFromZero()
    out = _sample(sd, guidance=[term])
    assert len(term.norms) == STEPS and all(n > 0 for n in term.norms)
    assert not out.requires_grad


def test_gradient_with_respect_to_prompt_embedding(sd):
    """grad=True lets an observer take d||eps_cond - eps_uncond|| / d prompt_embeds at each step."""
    cond = sd.encode(PROMPTS[:1])
    embeds = cond["prompt_embeds"].clone().requires_grad_(True)
    grads = []

    def token_gradient(step):
        norm = (step.eps_cond - step.eps_uncond).flatten(1).norm(dim=1).sum()
        grads.append(torch.autograd.grad(norm, embeds)[0])

    sample(
        sd,
        cond.replace(prompt_embeds=embeds),
        SEEDS[:1],
        num_inference_steps=2,
        observers=[token_gradient],
        grad=True,
    )
    assert len(grads) == 2
    assert grads[0].shape == embeds.shape and grads[0].abs().sum() > 0


def test_sampler_never_mutates_the_model_scheduler(sd):
    before = dict(sd.scheduler.config)
    timesteps = sd.scheduler.timesteps.clone()
    _sample(sd)
    assert dict(sd.scheduler.config) == before and torch.equal(sd.scheduler.timesteps, timesteps)


def test_scheduler_by_name_keeps_the_training_schedule(sd):
    euler = scheduler_like("euler", sd.scheduler)
    assert torch.equal(euler.alphas_cumprod, sd.scheduler.alphas_cumprod)
    assert _sample(sd, scheduler=euler).shape == (len(PROMPTS), *sd.sample_shape)
    with pytest.raises(DiffmemError, match="unknown scheduler"):
        scheduler_like("heun-9000", sd.scheduler)


def test_class_conditional_guidance_uses_the_null_class():
    denoiser = wrap_pipeline(tiny_unet2d(class_conditional=True, num_classes=10))
    recorder = Recorder()
    out = sample(
        denoiser,
        denoiser.encode([0, 7]),
        [1, 1],
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        observers=[recorder],
    )
    assert recorder.steps[0].null["class_labels"].tolist() == [10, 10]
    assert not torch.allclose(out[0], out[1])  # same seed, different class
    with pytest.raises(DiffmemError, match=r"class labels must be in \[0, 10\)"):
        denoiser.encode([10])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seeds": [1]}, "got 1 seeds for a batch of 3"),
        ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a finite non-negative number"),
        ({"scheduler": "pndm", "eta": 0.5}, "eta applies to DDIM"),
    ],
)
def test_bad_sampler_arguments(sd, kwargs, message):
    options = {"seeds": SEEDS, "num_inference_steps": STEPS, **kwargs}
    if "scheduler" in options:
        options["scheduler"] = scheduler_like(options["scheduler"], sd.scheduler)
    with pytest.raises(DiffmemError, match=message):
        sample(sd, sd.encode(PROMPTS), **options)


def test_unconditional_models_refuse_a_guidance_scale():
    denoiser = wrap_pipeline(tiny_unet2d())
    with pytest.raises(DiffmemError, match="unconditional models have no classifier-free guidance"):
        sample(denoiser, denoiser.encode([None]), [0], num_inference_steps=2, guidance_scale=7.5)


def test_mismatched_dtype_or_batch_is_a_clear_error(sd):
    cond = sd.encode(PROMPTS[:1])
    x = torch.randn(1, *sd.sample_shape)
    with pytest.raises(DiffmemError, match="x_t is torch.float16 but the model runs in torch.float32"):
        sd.eps(x.half(), torch.tensor(999), cond)
    with pytest.raises(DiffmemError, match="x_t has batch 2 but the condition has 1"):
        sd.eps(torch.cat([x, x]), torch.tensor(999), cond)

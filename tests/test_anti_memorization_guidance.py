"""Anti-Memorization Guidance (SPEC §5) on tiny random-weight pipelines with small training-set indexes:
each term against its equation, the gate, per-sample records, and the model kinds it supports."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffmem.adapters import wrap_pipeline
from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex
from diffmem.mitigate import ReferenceSet, SamplingOptions, mitigated_generate, mitigation_config
from diffmem.mitigate.anti_memorization_guidance import (
    GATES,
    AntiMemorizationConfig,
    AntiMemorizationGuidance,
)
from diffmem.mitigate.training_similarity import training_similarity
from diffmem.models.tiny import tiny_unet2d
from diffmem.sampling import generate, generation_seed, sample

PROMPTS = ["a red sneaker at the top left", "the zorblax vase poster"]
SAMPLING = SamplingOptions(num_inference_steps=3, guidance_scale=7.5)
CAPTIONS = ["the zorblax vase poster", "a blue bag", "a green coat"]


class Embedder(torch.nn.Module):
    """A fixed random 'copy detector': images to unit vectors."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.projection = torch.nn.Linear(3 * 4 * 4, dim)
        torch.nn.init.normal_(self.projection.weight, generator=torch.Generator().manual_seed(1))

    def forward(self, images):
        return F.normalize(self.projection(F.adaptive_avg_pool2d(images, 4).flatten(1)), dim=1)


@pytest.fixture(scope="module")
def training_images(sd):
    """A 'training set': the model's own plain generations (so they are near), plus random images."""
    own = generate(sd, PROMPTS, num_inference_steps=3).images
    noise = torch.rand((58, *own.shape[1:]), generator=torch.Generator().manual_seed(2))
    return torch.cat([own, noise])


@pytest.fixture(scope="module")
def pixels(training_images):
    captions = [CAPTIONS[i % 3] for i in range(len(training_images))]
    return ReferenceSet(TrainingSetIndex.build_pixels(training_images, captions, ids=list(range(100, 160))))


@pytest.fixture(scope="module")
def embeddings(training_images):
    encoder = Embedder()
    with torch.no_grad():
        vectors = encoder(training_images)
    counts = [25] * len(training_images)  # every caption "duplicated" enough for G_dup
    captions = [CAPTIONS[i % 3] for i in range(len(training_images))]
    return ReferenceSet(TrainingSetIndex.build_embeddings(vectors, captions, caption_counts=counts), encoder)


class Capture:
    """A guidance term that runs AMG and, first, computes what each of its terms should return."""

    needs_grad = True

    def __init__(self, amg: AntiMemorizationGuidance, reference: ReferenceSet, c1: float = 13.0):
        self.amg, self.reference, self.c1 = amg, reference, c1
        self.expected, self.returned = [], []

    def __call__(self, step):
        images = self.amg.denoiser.decode(step.x0_hat).float()
        sigma, nearest = training_similarity(images, self.reference)
        (gradient,) = torch.autograd.grad(sigma.sum(), step.x_t, retain_graph=True)
        d_t = (step.eps_cond - step.eps_uncond).detach()
        sig = sigma.detach()
        s1 = (self.c1 * sig).clamp(0, step.guidance_scale - 1)
        captions = [self.reference.index.captions[int(r)] for r in nearest]
        with torch.no_grad():
            eps_caption = self.amg.denoiser.eps(step.x_t.detach(), step.t, self.amg.denoiser.encode(captions))
        room = step.guidance_scale - 1  # s0 - 1 - s1 with s1 = 0 (no despecification term)
        s2 = (room / 0.3 * sig).clamp(0, room)
        dup = -s2.view(-1, 1, 1, 1) * (eps_caption - step.eps_uncond.detach())  # eq. 15-16
        self.expected.append(
            {
                "sigma": sig,
                "nearest": nearest,
                "spe": -s1.view(-1, 1, 1, 1) * d_t,
                "gradient": gradient,
                "s1": s1,
                "dup": dup,
            }
        )
        correction = self.amg(step)
        self.returned.append(correction.detach())
        return correction


def _run(denoiser, config, reference, steps=3):
    amg = AntiMemorizationGuidance(denoiser, config, len(PROMPTS))
    capture = Capture(amg, reference, config.c1)
    seeds = [generation_seed(0, i, 0) for i in range(len(PROMPTS))]
    sample(
        denoiser,
        denoiser.encode(PROMPTS),
        seeds,
        num_inference_steps=steps,
        guidance_scale=7.5,
        guidance=[capture],
    )
    return amg, capture


def test_despecification_is_minus_s1_times_the_text_direction(sd, embeddings):
    config = mitigation_config("amg", reference=embeddings, terms=("despecification",), gate="always")
    _, capture = _run(sd, config, embeddings)
    for expected, returned in zip(capture.expected, capture.returned):
        assert (expected["s1"] > 0).any()
        torch.testing.assert_close(returned, expected["spe"])  # eq. 13-14


@pytest.mark.parametrize(("c3_scale", "gate_shift"), [(1.0, 0.0), (2.5, 0.1)])
def test_dissimilarity_follows_the_similarity_gradient_with_the_reference_strength(
    sd, embeddings, c3_scale, gate_shift
):
    config = mitigation_config(
        "amg",
        reference=embeddings,
        terms=("dissimilarity",),
        gate="always",
        c3_scale=c3_scale,
        gate_shift=gate_shift,
    )
    amg, capture = _run(sd, config, embeddings)
    schedule = sd.scheduler.__class__.from_config(sd.scheduler.config)
    schedule.set_timesteps(3)
    for t, expected, returned in zip(schedule.timesteps, capture.expected, capture.returned):
        sigma = expected["sigma"]
        c3 = c3_scale * 100.0 * (sigma - 0.3 - gate_shift) * math.exp((1000.0 - float(t)) / 170.0)
        alpha_bar = sd.alpha_bar(t)
        # G_sim = c3 sqrt(1 - abar_t) grad sigma   (eq. 17)
        torch.testing.assert_close(
            returned, c3.view(-1, 1, 1, 1) * (1 - alpha_bar).sqrt() * expected["gradient"]
        )
    assert amg.guided_steps == [3, 3]


def test_deduplication_guides_away_from_the_neighbours_caption(sd, embeddings):
    config = mitigation_config(
        "amg", reference=embeddings, terms=("deduplication",), gate="always", min_caption_copies=20
    )
    amg, capture = _run(sd, config, embeddings, steps=1)
    assert amg.extra_evaluations == 2  # one conditional evaluation per guided sample and step
    returned, expected = capture.returned[0], capture.expected[0]
    assert returned.abs().sum() > 0
    torch.testing.assert_close(returned, expected["dup"])
    few = mitigation_config(
        "amg", reference=embeddings, terms=("deduplication",), gate="always", min_caption_copies=25
    )
    amg, capture = _run(sd, few, embeddings, steps=1)
    assert amg.extra_evaluations == 0 and capture.returned[0].abs().sum() == 0  # 25 copies is not > 25


def test_a_closed_gate_leaves_sampling_exactly_as_plain_sampling(sd, pixels):
    config = mitigation_config("amg", reference=pixels, gate="never")
    guarded = mitigated_generate(sd, PROMPTS, "amg", config, n_generations=2, sampling=SAMPLING)
    plain = generate(sd, PROMPTS, n_generations=2, num_inference_steps=3, guidance_scale=7.5)
    assert torch.equal(guarded.images, plain.images)
    assert guarded.guided_steps == [0] * 4 and guarded.status == ["ok"] * 4
    assert all(s <= 0 for s in guarded.extras["amg_max_similarity"])  # sigma = -nL2
    assert set(guarded.extras["amg_nearest_id"]) <= set(range(100, 160))


def test_a_gate_is_checked_every_few_steps_until_it_first_opens_then_every_step(sd, pixels):
    plain = generate(sd, PROMPTS, num_inference_steps=5, guidance_scale=7.5)
    watched = mitigated_generate(
        sd,
        PROMPTS,
        "amg",
        mitigation_config("amg", reference=pixels, gate="never", check_every=2),
        sampling=SamplingOptions(num_inference_steps=5, guidance_scale=7.5),
    )
    assert watched.extras["amg_checks"] == [3, 3]  # steps 0, 2 and 4
    assert torch.equal(watched.images, plain.images)
    strided, every = (
        mitigated_generate(
            sd,
            PROMPTS,
            "amg",
            mitigation_config("amg", reference=pixels, gate="always", c3=50.0, check_every=k),
            sampling=SAMPLING,
        )
        for k in (2, 1)
    )
    assert strided.guided_steps == every.guided_steps == [3, 3]  # open from step 0: checked at each step
    assert torch.equal(strided.images, every.images)


def test_a_sample_whose_guidance_stopped_goes_back_to_the_stride(sd, embeddings):
    reference = _nan_gradient_for_second(embeddings)
    config = mitigation_config(
        "amg", reference=reference, terms=("dissimilarity",), gate="always", check_every=2
    )
    result = mitigated_generate(sd, PROMPTS, "amg", config, sampling=SAMPLING)
    assert result.status == ["ok", "nonfinite"] and result.guided_steps == [3, 0]
    assert result.extras["amg_checks"] == [3, 2]  # the second sample: steps 0 and 2 only


@pytest.mark.supports("amg", "stable-diffusion")
def test_pixel_amg_lowers_the_similarity_to_the_training_set(sd, pixels, training_images):
    plain = generate(sd, PROMPTS, num_inference_steps=3, guidance_scale=7.5).images
    config = mitigation_config("amg", reference=pixels, gate="always", c3=2000.0)
    guided = mitigated_generate(sd, PROMPTS, "amg", config, sampling=SAMPLING).images
    with torch.no_grad():
        before, _ = training_similarity(plain, pixels)
        after, _ = training_similarity(guided, pixels)
    assert (before > -1e-6).all()  # the plain generations are in the training set: nL2 = 0
    assert (after < before - 0.1).all()


class _NanForSecond(torch.autograd.Function):
    """Identity whose gradient is NaN for the second sample while both samples are guided."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        if len(grad) == 2:
            grad[1] = float("nan")
        return grad


def _nan_gradient_for_second(embeddings):
    """The embedding reference with a copy detector whose gradient breaks for the second sample."""

    class Broken(torch.nn.Module):
        def forward(self, images):
            return embeddings.encoder(_NanForSecond.apply(images))

    return ReferenceSet(embeddings.index, Broken())


def test_a_nonfinite_guidance_stops_for_that_sample_only(sd, embeddings):
    reference = _nan_gradient_for_second(embeddings)
    config = mitigation_config("amg", reference=reference, terms=("dissimilarity",), gate="always")
    result = mitigated_generate(sd, PROMPTS, "amg", config, sampling=SAMPLING)
    assert result.status == ["ok", "nonfinite"] and result.guided_steps == [3, 0]
    assert result.images.isfinite().all()


@pytest.mark.supports("amg", "unet2d")
def test_class_conditional_and_unconditional_models_with_ddpm_and_ddim():
    for class_conditional in (True, False):
        for scheduler in ("ddpm", "ddim"):
            denoiser = wrap_pipeline(tiny_unet2d(class_conditional=class_conditional, scheduler=scheduler))
            images = generate(
                denoiser,
                [1] if class_conditional else [None],
                n_generations=2,
                num_inference_steps=2,
                guidance_scale=2.0 if class_conditional else 1.0,
            ).images
            reference = ReferenceSet(
                TrainingSetIndex.build_pixels(torch.cat([images, images.flip(0)]), ["a"] * 4)
            )
            config = mitigation_config("amg", reference=reference, gate="always", nl2_k=2, c3=10.0)
            sampling = SamplingOptions(
                num_inference_steps=2, guidance_scale=2.0 if class_conditional else 1.0
            )
            result = mitigated_generate(
                denoiser,
                [1] if class_conditional else [None],
                "amg",
                config,
                n_generations=2,
                sampling=sampling,
            )
            assert result.guided_steps == [2, 2] and result.images.isfinite().all()


def test_bad_configurations_are_one_line_errors(sd, pixels, embeddings):
    with pytest.raises(DiffmemError, match="needs the copy-detection encoder"):
        ReferenceSet(embeddings.index)
    with pytest.raises(DiffmemError, match="unknown AMG gate"):
        mitigation_config("amg", reference=pixels, gate="parabola")
    with pytest.raises(DiffmemError, match="AMG terms must be among"):
        mitigation_config("amg", reference=pixels, terms=("despecify",))
    with pytest.raises(DiffmemError, match="c3_scale must be positive"):
        mitigation_config("amg", reference=pixels, c3_scale=0.0)
    for bad in (0, 1.5):
        with pytest.raises(DiffmemError, match="check_every (must be|takes) a whole number"):
            mitigation_config("amg", reference=pixels, check_every=bad)
    with pytest.raises(DiffmemError, match="check_margin must be non-negative"):
        mitigation_config("amg", reference=pixels, check_margin=-0.1)
    with pytest.raises(DiffmemError, match=r"scale > 1"):
        mitigated_generate(
            sd, PROMPTS, "amg", mitigation_config("amg", reference=pixels), sampling=SamplingOptions(3, 1.0)
        )
    small = ReferenceSet(TrainingSetIndex.build_pixels(torch.rand(4, 3, 4, 4), ["a"] * 4))
    with pytest.raises(DiffmemError, match="build the index at the model's resolution"):
        mitigated_generate(sd, PROMPTS, "amg", mitigation_config("amg", reference=small), sampling=SAMPLING)


def test_reference_gate_curves():
    assert GATES["sscd"](0) == pytest.approx(0.4) and GATES["sscd"](1000) == pytest.approx(0.3, abs=1e-3)
    assert GATES["nl2-cifar"](0) == pytest.approx(-1.5) and GATES["nl2-cifar"](1000) == pytest.approx(
        -1.95, abs=1e-3
    )


def test_the_excess_rule_sets_the_step_that_lowers_similarity_by_its_excess_to_first_order():
    from diffmem.mitigate.anti_memorization_guidance import excess_c3

    gradient = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gradient[2] = 0.0
    excess, alpha_bar = torch.tensor([0.2, -0.1, 0.3]), torch.tensor(0.36)
    c3 = excess_c3(excess, gradient, alpha_bar)
    # first-order drop of sigma_t: (1 - abar_t) c3 |g|^2
    drop = (1 - alpha_bar) * c3 * gradient.flatten(1).square().sum(1)
    assert (
        drop[0] == pytest.approx(0.2, rel=1e-5) and c3[1] == 0 and c3[2] == 0
    )  # under the gate; no gradient
    assert excess_c3(excess, 10 * gradient, alpha_bar)[0] == pytest.approx(
        c3[0] / 100, rel=1e-5
    )  # scale-free


def test_an_unknown_c3_rule_is_refused(embeddings):
    with pytest.raises(DiffmemError, match="c3_rule must be one of reference, excess"):
        AntiMemorizationConfig(reference=embeddings, c3_rule="big")


def test_a_flow_models_velocity_correction_moves_its_clean_estimate_as_the_eps_correction_would():
    """At a fixed x_t the velocity change moves x0_hat = x_t - sigma v exactly as the eps change moves the
    variance-preserving twin's x0_hat; at pure noise there is none."""
    from diffmem.core.denoiser import flow_sigma
    from diffmem.mitigate.anti_memorization_guidance import flow_input_scale, velocity_correction

    d_eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for sigma in (0.2, 0.5, 0.9):
        alpha_bar = torch.tensor((1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2))
        assert float(flow_sigma(alpha_bar)) == pytest.approx(sigma)
        assert float(flow_input_scale(alpha_bar)) == pytest.approx(((1 - sigma) ** 2 + sigma**2) ** 0.5)
        twin = (
            -((1 - alpha_bar) / alpha_bar).sqrt() * d_eps
        )  # x0_hat = (x' - sqrt(1 - abar) eps) / sqrt(abar)
        assert torch.allclose(-sigma * velocity_correction(d_eps, alpha_bar), twin, atol=1e-5)
    assert not velocity_correction(d_eps, torch.tensor(0.0)).any()

"""Training-time policies' arithmetic (SPEC §4, §6, §7): the ambient loss in its VE and VP forms, the
magnitude filter, caption randomisation."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffmem.core.denoiser import eps_from_model_output
from diffmem.errors import DiffmemError
from diffmem.sampling.schedulers import STABLE_DIFFUSION_SCHEDULE
from diffmem.train.ambient_loss import (
    ambient_flow_input,
    ambient_input,
    ambient_loss_flow,
    ambient_loss_ve,
    ambient_loss_vp,
    ambient_vp_input,
    edm_weight,
    flow_sigma_n,
    noisy_copies,
    sigma_of_alpha_bar,
    timestep_of_sigma,
)
from diffmem.train.caption_randomisation import CaptionRandomisationConfig, randomise_captions
from diffmem.train.magnitude_filter import MagnitudeFilter, MagnitudeFilterConfig

SHAPE = (6, 3, 4, 4)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_noisy_copies_are_fixed_per_image_whatever_the_batch():
    images = _randn(*SHAPE, seed=0)
    copies = noisy_copies(images, [10, 11, 12, 13, 14, 15], sigma_n=0.5)
    again = noisy_copies(images[[3, 1]], [13, 11], sigma_n=0.5)
    torch.testing.assert_close(again, copies[[3, 1]])
    assert (copies - images).std() == pytest.approx(0.5, rel=0.2)
    assert not torch.equal(
        noisy_copies(images, list(range(6)), 0.5, seed=1), noisy_copies(images, list(range(6)), 0.5)
    )


def test_below_sigma_n_the_ambient_loss_is_the_ordinary_loss():
    clean, noisy, z = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2), _randn(*SHAPE, seed=3)
    sigma = torch.tensor([0.1, 0.2, 0.3, 0.35, 0.4, 0.45], dtype=torch.float64)  # all below sigma_n = 0.5
    x = ambient_input(clean, noisy, sigma, 0.5, z)
    torch.testing.assert_close(x, clean + sigma.view(-1, 1, 1, 1) * z)
    denoised = _randn(*SHAPE, seed=4)
    ordinary = edm_weight(sigma) * (denoised - clean).square().flatten(1).mean(1)
    torch.testing.assert_close(ambient_loss_ve(denoised, x, clean, noisy, sigma, 0.5), ordinary)


def test_above_sigma_n_the_target_is_the_noisy_copy_and_a_perfect_ambient_denoiser_scores_zero():
    clean, z = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=3)
    noisy = noisy_copies(clean, list(range(6)), 0.5)
    sigma = torch.full((6,), 2.0, dtype=torch.float64)
    x = ambient_input(clean, noisy, sigma, 0.5, z)
    torch.testing.assert_close(x, noisy + math.sqrt(4.0 - 0.25) * z)
    # a denoiser that returns E[y_n | x] rescaled as the ambient prediction inverts: D such that
    # (s^2 - n^2)/s^2 D + n^2/s^2 x = y_n exactly
    exact = (noisy - (0.25 / 4.0) * x) / ((4.0 - 0.25) / 4.0)
    assert torch.allclose(
        ambient_loss_ve(exact, x, clean, noisy, sigma, 0.5), torch.zeros(6, dtype=torch.float64)
    )
    # the clean image is *not* the target above sigma_n
    assert (ambient_loss_ve(clean, x, clean, noisy, sigma, 0.5) > 0).all()


def test_the_vp_form_equals_the_ve_form_for_an_eps_network():
    clean, noisy, z, eps = (_randn(*SHAPE, seed=s) for s in (1, 2, 3, 5))
    alpha_bar = torch.tensor([0.99, 0.9, 0.7, 0.5, 0.2, 0.05], dtype=torch.float64)
    sigma = sigma_of_alpha_bar(alpha_bar)
    sigma_n = float(sigma[3])  # the batch straddles sigma_n
    x_t = ambient_vp_input(clean, noisy, alpha_bar, sigma_n, z)
    x = x_t / alpha_bar.sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(x, ambient_input(clean, noisy, sigma, sigma_n, z))
    denoised = x - sigma.view(-1, 1, 1, 1) * eps  # the eps network's clean estimate
    vp = ambient_loss_vp(eps, x_t, alpha_bar, clean, noisy, sigma_n)
    ve = ambient_loss_ve(denoised, x, clean, noisy, sigma, sigma_n, weight=lambda s: 1 / s**2)
    torch.testing.assert_close(vp, ve)
    low = sigma < sigma_n  # below sigma_n: the ordinary eps loss
    torch.testing.assert_close(vp[low], (eps - z)[low].square().flatten(1).mean(1))
    # above: s^2/sigma^2 ||z - (s/sigma) eps||^2 with s = sqrt(sigma^2 - sigma_n^2) (closed form)
    s = (sigma**2 - sigma_n**2).clamp_min(0).sqrt().view(-1, 1, 1, 1)
    closed = (
        ((s / sigma.view(-1, 1, 1, 1)) ** 2 * (z - s / sigma.view(-1, 1, 1, 1) * eps).square())
        .flatten(1)
        .mean(1)
    )
    torch.testing.assert_close(vp[~low], closed[~low])


def test_the_rectified_flow_form_equals_the_ve_form_and_stays_finite_at_pure_noise():
    clean, noisy, z, velocity = (_randn(*SHAPE, seed=s) for s in (1, 2, 3, 5))
    s = torch.tensor([0.05, 0.3, 0.5, 0.6, 0.9, 1.0], dtype=torch.float64)  # s = 1: x_T, SD3's first step
    sigma_n = 1.0
    assert flow_sigma_n(sigma_n) == 0.5  # the batch straddles s_n
    x_t = ambient_flow_input(clean, noisy, s, sigma_n, z)
    flow = ambient_loss_flow(velocity, x_t, clean, noisy, s, sigma_n)
    assert torch.isfinite(flow).all()
    inner = s < 1  # sigma = s / (1 - s) is finite: compare with the VE form
    sigma = s[inner] / (1 - s[inner])
    x = x_t[inner] / (1 - s[inner]).view(-1, 1, 1, 1)
    torch.testing.assert_close(x, ambient_input(clean[inner], noisy[inner], sigma, sigma_n, z[inner]))
    denoised = x_t[inner] - s[inner].view(-1, 1, 1, 1) * velocity[inner]
    ve = ambient_loss_ve(
        denoised, x, clean[inner], noisy[inner], sigma, sigma_n, weight=lambda g: (1 + g) ** 2 / g**2
    )
    torch.testing.assert_close(flow[inner], ve)
    low = s < 0.5  # below s_n: the plain rectified-flow loss ||v - (z - y)||^2
    torch.testing.assert_close(flow[low], (velocity - (z - clean))[low].square().flatten(1).mean(1))
    # at s = 1 the input is pure noise and the target the noisy copy: D = x_T - v against y_n
    torch.testing.assert_close(x_t[-1], z[-1])
    torch.testing.assert_close(flow[-1], (z[-1] - velocity[-1] - noisy[-1]).square().mean())
    # sigma_n = 0 (no ambient policy: the noisy copies are the images): plain rectified-flow training
    plain = ambient_loss_flow(
        velocity, (1 - s.view(-1, 1, 1, 1)) * clean + s.view(-1, 1, 1, 1) * z, clean, clean, s, 0.0
    )
    torch.testing.assert_close(plain, (velocity - (z - clean)).square().flatten(1).mean(1))


def test_sigma_n_maps_to_a_timestep_of_the_schedule_and_outside_it_is_refused():
    alphas_cumprod = DDPMScheduler(**STABLE_DIFFUSION_SCHEDULE).alphas_cumprod
    t_n = timestep_of_sigma(alphas_cumprod, 1.0)
    sigmas = sigma_of_alpha_bar(alphas_cumprod.double())
    assert sigmas[t_n] >= 1.0 > sigmas[t_n - 1]
    with pytest.raises(DiffmemError, match="outside the schedule"):
        timestep_of_sigma(alphas_cumprod, 1e6)
    with pytest.raises(DiffmemError, match="outside the schedule"):
        timestep_of_sigma(alphas_cumprod, 0.0)


def test_the_filter_drops_exactly_the_samples_at_or_above_the_threshold():
    eps_uncond = torch.zeros(4, 1, 2, 2)
    model_pred = torch.stack([torch.full((1, 2, 2), v) for v in (0.5, 1.0, 1.5, 0.1)])  # norms 1, 2, 3, 0.2
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    result = MagnitudeFilter(MagnitudeFilterConfig(threshold=2.0))(losses, model_pred, eps_uncond)
    assert result.kept.tolist() == [True, False, False, True]
    assert result.loss.item() == pytest.approx((1.0 + 4.0) / 2) and result.drop_rate == 0.5
    result.loss.backward()
    assert losses.grad.tolist() == [0.5, 0.0, 0.0, 0.5]


def test_a_filter_that_drops_everything_gives_a_zero_loss_and_warns_instead_of_spinning():
    flt = MagnitudeFilter(MagnitudeFilterConfig(threshold=0.1, warn_after_steps=3))
    losses = torch.ones(2, requires_grad=True)
    for _ in range(2):
        flt(losses, torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))
    with pytest.warns(RuntimeWarning, match="dropped every sample for 3 steps"):
        result = flt(losses, torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))
    assert result.loss.item() == 0.0 and result.loss.requires_grad
    with pytest.raises(DiffmemError, match="positive number"):
        MagnitudeFilterConfig(threshold=0)


def test_the_filter_default_and_quantile_thresholds():
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert MagnitudeFilter().threshold == 2.0  # Wen et al.'s SD 1.4 value when none is given
    calibrated = MagnitudeFilterConfig(quantile=0.75).calibrated(norms)
    assert calibrated.threshold == 4.0 and calibrated.quantile is None
    assert MagnitudeFilter(calibrated).threshold == 4.0
    with pytest.raises(DiffmemError, match="calibrate the magnitude filter's quantile first"):
        MagnitudeFilter(MagnitudeFilterConfig(quantile=0.75))
    with pytest.raises(DiffmemError, match="a threshold or a quantile, not both"):
        MagnitudeFilterConfig(threshold=2.0, quantile=0.9)
    with pytest.raises(DiffmemError, match=r"quantile must lie in \(0, 1\)"):
        MagnitudeFilterConfig(quantile=1.0)
    with pytest.raises(DiffmemError, match="fixed threshold"):
        MagnitudeFilterConfig(threshold=2.0).calibrated(norms)


def test_caption_randomisation_is_seeded_per_sample_and_step():
    captions = [f"the item {i} poster at the top left" for i in range(200)]
    vocabulary = ["red", "bag", "zorblax", "left"]
    config = CaptionRandomisationConfig(p=0.1)
    out = randomise_captions(captions, list(range(200)), step=7, vocabulary=vocabulary, config=config)
    changed = [i for i, (a, b) in enumerate(zip(captions, out)) if a != b]
    assert 5 <= len(changed) <= 40  # p = 0.1 of 200
    assert all(set(out[i].split()) <= set(vocabulary) and len(out[i].split()) == 8 for i in changed)
    again = randomise_captions([captions[i] for i in changed], changed, 7, vocabulary, config)
    assert again == [out[i] for i in changed]  # the draw depends on (seed, step, index), not the batch
    augmented = randomise_captions(
        captions, list(range(200)), 7, vocabulary, CaptionRandomisationConfig(p=1.0, mode="augment")
    )
    assert all(len(a.split()) == len(c.split()) + 1 for a, c in zip(augmented, captions))
    assert (
        randomise_captions(captions, list(range(200)), 7, vocabulary, CaptionRandomisationConfig(p=0.0))
        == captions
    )
    with pytest.raises(DiffmemError, match="needs a caption for every sample"):
        randomise_captions([None], [0], 0, vocabulary, config)


def test_with_sigma_n_zero_the_ambient_input_and_loss_are_plain_ddpm_training():
    clean, z, eps = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=3), _randn(*SHAPE, seed=5)
    alpha_bar = torch.tensor([0.9991, 0.9, 0.7, 0.5, 0.2, 0.0047], dtype=torch.float64)
    x_t = ambient_vp_input(clean, clean, alpha_bar, 0.0, z)
    a = alpha_bar.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * clean + (1 - a).sqrt() * z)  # Ho et al., eq. 4
    loss = ambient_loss_vp(eps, x_t, alpha_bar, clean, clean, 0.0)
    torch.testing.assert_close(loss, (eps - z).square().flatten(1).mean(1))  # Ho et al., eq. 14


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_below_sigma_n_velocity_and_sample_networks_train_on_their_own_plain_loss(prediction_type):
    clean, z, output = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=3), _randn(*SHAPE, seed=5)
    alpha_bar = torch.tensor([0.9991, 0.9, 0.7, 0.5, 0.2, 0.0047], dtype=torch.float64)
    a = alpha_bar.view(-1, 1, 1, 1)
    x_t = ambient_vp_input(clean, clean, alpha_bar, 0.0, z)
    eps = eps_from_model_output(output, x_t, a, prediction_type)
    loss = ambient_loss_vp(eps, x_t, alpha_bar, clean, clean, 0.0, prediction_type)
    # v = sqrt(abar) z - sqrt(1 - abar) y (Salimans & Ho 2022, section 4); a sample network's target is y
    target = a.sqrt() * z - (1 - a).sqrt() * clean if prediction_type == "v_prediction" else clean
    torch.testing.assert_close(loss, (output - target).square().flatten(1).mean(1))
    with pytest.raises(DiffmemError, match="unknown prediction type 'x0'"):
        ambient_loss_vp(eps, x_t, alpha_bar, clean, clean, 0.0, "x0")

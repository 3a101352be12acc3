"""The denoiser contract: eps conversion, the schedule, encoding, decoding, the adapters' families."""

import pytest
import torch

from diffmem.adapters import StableDiffusionDenoiser, StableDiffusionXLDenoiser, UNet2DDenoiser, wrap_pipeline
from diffmem.core.denoiser import Denoiser, eps_from_model_output, x0_from_eps
from diffmem.errors import DiffmemError
from diffmem.models.tiny import tiny_stable_diffusion, tiny_stable_diffusion_xl, tiny_unet2d


def _noisy(shape=(2, 4, 8, 8), alpha_bar=0.3):
    x0, eps = torch.randn(shape), torch.randn(shape)
    abar = torch.tensor(alpha_bar)
    return x0, eps, abar, abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def test_v_and_x0_predictions_convert_to_the_true_noise():
    x0, eps, abar, x_t = _noisy()
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(eps_from_model_output(v, x_t, abar, "v_prediction"), eps)
    torch.testing.assert_close(eps_from_model_output(x0, x_t, abar, "sample"), eps)
    assert eps_from_model_output(eps, x_t, abar, "epsilon") is eps
    torch.testing.assert_close(x0_from_eps(x_t, eps, abar), x0)
    with pytest.raises(ValueError, match="unknown prediction type"):
        eps_from_model_output(eps, x_t, abar, "flow")


def test_v_prediction_adapter_returns_eps():
    denoiser = wrap_pipeline(tiny_stable_diffusion(prediction_type="v_prediction"))
    cond = denoiser.encode(["a red sneaker"])
    x_t, t = torch.randn(1, *denoiser.sample_shape), torch.tensor(400)
    v = denoiser.unet(x_t, t, encoder_hidden_states=cond["prompt_embeds"]).sample
    abar = denoiser.scheduler.alphas_cumprod[400]
    torch.testing.assert_close(denoiser.eps(x_t, t, cond), abar.sqrt() * v + (1 - abar).sqrt() * x_t)


def test_alpha_bar_follows_the_training_schedule():
    denoiser = wrap_pipeline(tiny_stable_diffusion())
    table = denoiser.scheduler.alphas_cumprod
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(denoiser.alpha_bar(t), table[t])
    mid = denoiser.alpha_bar(torch.tensor(500.5))  # between steps: sigma interpolated linearly, as Euler does
    assert table[501] < mid < table[500]


def test_families_and_shapes():
    sd = wrap_pipeline(tiny_stable_diffusion())
    sdxl = wrap_pipeline(tiny_stable_diffusion_xl())
    pixel = wrap_pipeline(tiny_unet2d())
    assert isinstance(sd, StableDiffusionDenoiser) and not isinstance(sd, StableDiffusionXLDenoiser)
    assert isinstance(sdxl, StableDiffusionXLDenoiser) and isinstance(pixel, UNet2DDenoiser)
    assert all(isinstance(d, Denoiser) for d in (sd, sdxl, pixel))
    assert (sd.sample_shape, sd.resolution) == ((4, 8, 8), (16, 16))
    assert pixel.sample_shape == (3, 8, 8) and pixel.conditioning == "none"
    assert sd.decode(torch.randn(2, *sd.sample_shape)).shape == (2, 3, 16, 16)
    image = pixel.decode(torch.randn(2, 3, 8, 8) * 3)
    assert image.min() >= 0 and image.max() <= 1


def test_text_encoding_matches_the_pipeline_and_the_null_is_the_empty_prompt():
    pipe = tiny_stable_diffusion()
    denoiser = wrap_pipeline(pipe)
    cond = denoiser.encode(["a red sneaker", "a blue bag"])
    expected, _ = pipe.encode_prompt(["a red sneaker", "a blue bag"], "cpu", 1, False)
    assert torch.equal(cond["prompt_embeds"], expected) and cond.prompts == ("a red sneaker", "a blue bag")
    null = denoiser.null_condition(3)
    assert null.batch_size == 3 and torch.equal(
        null["prompt_embeds"][2], denoiser.encode([""])["prompt_embeds"][0]
    )
    with pytest.raises(DiffmemError, match="no prompts"):
        denoiser.encode([])
    with pytest.raises(DiffmemError, match="prompts must be strings"):
        denoiser.encode(["ok", 3])


def test_sdxl_condition_and_zero_null():
    denoiser = wrap_pipeline(tiny_stable_diffusion_xl())
    cond = denoiser.encode(["a red sneaker", "a blue bag"])
    assert cond["prompt_embeds"].shape == (2, 77, 64) and cond["text_embeds"].shape == (2, 32)
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    null = denoiser.null_condition(2)  # force_zeros_for_empty_prompt, as the SDXL pipeline does
    assert not null["prompt_embeds"].any() and not null["text_embeds"].any()
    assert null["time_ids"].tolist() == cond["time_ids"].tolist()
    assert cond["prompt_embeds"].any()  # zeroing the null did not touch the prompt's embedding


def test_learned_variance_is_split_off_the_noise():
    denoiser = wrap_pipeline(tiny_unet2d(learned_variance=True))
    prediction = denoiser.predict(torch.randn(2, 3, 8, 8), torch.tensor(10), denoiser.encode([None, None]))
    assert prediction.eps.shape == prediction.variance.shape == (2, 3, 8, 8)


def test_bad_resolution_and_null_class():
    with pytest.raises(DiffmemError, match="multiple of the VAE factor 2"):
        StableDiffusionDenoiser(tiny_stable_diffusion(), resolution=(15, 16))
    with pytest.raises(DiffmemError, match="null_class_label must be in"):
        UNet2DDenoiser(tiny_unet2d(class_conditional=True, num_classes=4), null_class_label=9)


def test_the_contract_gives_the_tokenizer_text_encoders_and_network_algorithms_need():
    sd = wrap_pipeline(tiny_stable_diffusion())
    sdxl = wrap_pipeline(tiny_stable_diffusion_xl())
    pixel = wrap_pipeline(tiny_unet2d())
    assert sd.tokenizer is sd.pipeline.tokenizer and sd.text_encoders == [sd.pipeline.text_encoder]
    assert sdxl.text_encoders == [sdxl.pipeline.text_encoder, sdxl.pipeline.text_encoder_2]
    assert pixel.tokenizer is None and pixel.text_encoders == []
    assert sd.network is sd.pipeline.unet and pixel.network is pixel.pipeline.unet

"""Loading from diffusers directories: same numbers as in memory, and errors that say what to do."""

import json

import pytest
import torch

from diffmem.adapters import load_denoiser, wrap_pipeline
from diffmem.errors import DiffmemError
from diffmem.models.info import describe
from diffmem.models.tiny import tiny_stable_diffusion, tiny_stable_diffusion_xl, tiny_unet2d


@pytest.mark.parametrize("build", [tiny_stable_diffusion, tiny_stable_diffusion_xl, tiny_unet2d])
def test_directory_round_trip_gives_the_same_predictions(build, tmp_path):
    pipe = build()
    pipe.save_pretrained(tmp_path)
    in_memory, loaded = wrap_pipeline(pipe), load_denoiser(tmp_path)
    assert type(in_memory) is type(loaded) and loaded.family == in_memory.family
    items = [None] if in_memory.conditioning == "none" else ["a red sneaker"]
    x_t = torch.randn(1, *in_memory.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    torch.testing.assert_close(
        loaded.eps(x_t, t, loaded.encode(items)),
        in_memory.eps(x_t, t, in_memory.encode(items)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_load_in_half_precision(tmp_path):
    tiny_stable_diffusion().save_pretrained(tmp_path)
    denoiser = load_denoiser(tmp_path, dtype=torch.bfloat16)
    assert (
        denoiser.dtype == torch.bfloat16 and denoiser.encode(["a"])["prompt_embeds"].dtype == torch.bfloat16
    )


def test_describe_reports_the_model(tmp_path):
    tiny_stable_diffusion_xl().save_pretrained(tmp_path)
    info = describe(load_denoiser(tmp_path))
    assert info.family == "stable-diffusion-xl" and info.pipeline_class == "StableDiffusionXLPipeline"
    assert info.resolution == (16, 16) and info.prediction_type == "epsilon"
    assert [e.name for e in info.text_encoders] == ["text_encoder", "text_encoder_2"]
    assert info.parameters["unet"] == sum(p.numel() for p in load_denoiser(tmp_path).unet.parameters())
    assert json.loads(json.dumps(info.to_dict()))["family"] == "stable-diffusion-xl"


def test_missing_directory(tmp_path):
    with pytest.raises(DiffmemError, match="no such model directory"):
        load_denoiser(tmp_path / "absent")


def test_directory_that_is_not_a_diffusers_model(tmp_path):
    with pytest.raises(DiffmemError, match="not a diffusers model directory"):
        load_denoiser(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(DiffmemError, match="not valid JSON"):
        load_denoiser(tmp_path)


def test_unsupported_family(tmp_path):
    index = {"_class_name": "HunyuanDiTPipeline", "transformer": ["diffusers", "HunyuanDiT2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiffmemError, match="unsupported model family HunyuanDiTPipeline"):
        load_denoiser(tmp_path)


def test_broken_weights(tmp_path):
    tiny_unet2d().save_pretrained(tmp_path)
    for weights in (tmp_path / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(DiffmemError, match="could not load the DDPMPipeline"):
        load_denoiser(tmp_path)

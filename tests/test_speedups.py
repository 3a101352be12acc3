"""Speedups compute the same scores: channels-last memory here, torch.compile in the opt-in slow test
(a compiled UNet still runs attention processors set after compilation)."""

import pytest
import torch

from diffmem.adapters import load_denoiser
from diffmem.cli.main import run
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.detect.registry import detector
from diffmem.errors import DiffmemError
from diffmem.models.source import open_model
from diffmem.models.speedups import Speedups, apply_speedups
from diffmem.models.tiny import tiny_stable_diffusion_3

PROMPTS = [f"a {c} bag at the bottom left" for c in ("red", "blue", "green", "tan")]


def scores(name: str, speedups: Speedups | None) -> torch.Tensor:
    config_class, detect = detector(name)
    denoiser = open_model("builtin:tiny-sd", speedups=speedups)
    return detect(denoiser, PROMPTS, config_class(batch_size=4)).scores


def test_channels_last_scores_the_same():
    fast = open_model("builtin:tiny-sd", speedups=Speedups(channels_last=True))
    conv = next(m for m in fast.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(scores("noise_norm", Speedups(channels_last=True)), scores("noise_norm", None))


def test_channels_last_reaches_a_transformer_family():
    def sd3_scores(speedups: Speedups | None) -> torch.Tensor:
        denoiser = apply_speedups(load_denoiser(tiny_stable_diffusion_3()), speedups)
        return noise_norm(denoiser, PROMPTS, NoiseNormConfig(batch_size=4)).scores

    fast = apply_speedups(load_denoiser(tiny_stable_diffusion_3()), Speedups(channels_last=True))
    conv = next(m for m in fast.transformer.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sd3_scores(Speedups(channels_last=True)), sd3_scores(None))


def test_an_unknown_compile_mode_is_refused(capsys):
    with pytest.raises(DiffmemError, match="unknown compile mode 'fastest'"):
        Speedups(compile_mode="fastest")
    assert run(["--compile", "fastest", "info", "--model", "builtin:tiny-sd"]) == 2
    assert "unknown compile mode" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["noise_norm", "attention_entropy"])
def test_a_compiled_unet_scores_the_same(name):
    compiled = Speedups(channels_last=True, compile_mode="default")
    torch.testing.assert_close(scores(name, compiled), scores(name, None), rtol=1e-4, atol=1e-5)

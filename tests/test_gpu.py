"""Opt-in (``pytest -m gpu``): the same parity in float16 on a CUDA device, with a looser tolerance."""

import pytest
import torch

from diffmem.adapters import load_denoiser
from diffmem.sampling import sample
from diffmem.tiny_pipelines import tiny_stable_diffusion, tiny_stable_diffusion_xl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PROMPTS = ["a red sneaker at the top left", "a blue bag"]
SEEDS = [3, 11]


@pytest.mark.parametrize(
    ("build", "size"),
    [
        (tiny_stable_diffusion, {}),
        (lambda: tiny_stable_diffusion(prediction_type="v_prediction"), {}),
        (tiny_stable_diffusion_xl, {"height": 16, "width": 16}),
    ],
)
def test_float16_parity_on_cuda(build, size):
    pipe = build().to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    reference = pipe(PROMPTS, num_inference_steps=10, generator=generators, output_type="pt", **size).images
    denoiser = load_denoiser(pipe, device="cuda", dtype=torch.float16)
    images = denoiser.decode(sample(denoiser, denoiser.encode(PROMPTS), SEEDS, num_inference_steps=10))
    assert (images.float() - reference.float()).abs().max() <= 2e-2

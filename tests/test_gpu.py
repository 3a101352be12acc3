"""Opt-in (``pytest -m gpu``): the same parity in float16 on a CUDA device, with a looser tolerance."""

import sys
from pathlib import Path

import pytest
import torch

from diffmem.adapters import load_denoiser
from diffmem.models.tiny import tiny_stable_diffusion, tiny_stable_diffusion_xl
from diffmem.sampling import sample

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


def test_a_real_cuda_out_of_memory_halves_the_batch_and_scores_the_same():
    """An SD 1.5-size UNet under a 6 GiB cap: a CFG batch of 2 x 64 latents does not fit, the scanner
    halves until it does, and the scores equal a scan at a batch size that fits from the start."""
    from diffmem.adapters import wrap_pipeline
    from diffmem.detect import NoiseNormConfig
    from diffmem.detect.scanner import Scanner

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from full_size import stable_diffusion_15

    denoiser = wrap_pipeline(stable_diffusion_15("cuda", torch.float16))
    prompts = [f"a photograph of item {i}, detailed" for i in range(64)]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(6 * 2**30 / total)
    try:
        scanner = Scanner(denoiser, config=NoiseNormConfig(batch_size=64))
        halved = scanner.update(prompts).scores
        assert scanner.halvings and scanner.halvings[0][0] == 64 and scanner.batch_size < 64
        reference = Scanner(denoiser, config=NoiseNormConfig(batch_size=4)).update(prompts).scores
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    torch.testing.assert_close(halved, reference, rtol=2e-2, atol=2e-2)

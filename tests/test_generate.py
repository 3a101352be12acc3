import pytest
import torch

from diffmem.errors import DiffmemError
from diffmem.sampling import generate, generation_seed, sample

PROMPTS = ["a red sneaker", "a blue bag", "a green hat"]


def test_generations_are_prompt_major_and_independent_of_batch_size(sd):
    small = generate(sd, PROMPTS, n_generations=2, base_seed=7, batch_size=1, num_inference_steps=2)
    large = generate(sd, PROMPTS, n_generations=2, base_seed=7, batch_size=6, num_inference_steps=2)
    assert small.prompt_id == [0, 0, 1, 1, 2, 2] and small.generation == [0, 1] * 3
    assert small.items[2] == "a blue bag" and small.images.shape == (6, 3, 16, 16)
    torch.testing.assert_close(small.latents, large.latents, rtol=1e-4, atol=1e-4)
    one = sample(sd, sd.encode(["a blue bag"]), [generation_seed(7, 1, 1)], num_inference_steps=2)
    torch.testing.assert_close(large.latents[3:4], one, rtol=1e-4, atol=1e-4)


def test_prompt_ids_name_the_seeds(sd):
    result = generate(sd, PROMPTS[:1], prompt_ids=[41], num_inference_steps=1, decode=False)
    assert result.images is None and result.seeds == [generation_seed(0, 41, 0)]
    assert result.to_table().column("prompt_id").to_pylist() == [41]


def test_bad_generate_arguments(sd):
    with pytest.raises(DiffmemError, match="prompt list is empty"):
        generate(sd, [])
    with pytest.raises(DiffmemError, match="got 1 prompt ids for 3 prompts"):
        generate(sd, PROMPTS, prompt_ids=[1])

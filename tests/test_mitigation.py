"""Prompt-embedding optimisation (SPEC §3), batched mitigated generation and guard mode, on tiny
random-weight pipelines."""

import pytest
import torch

from diffmem.adapters import wrap_pipeline
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex
from diffmem.mitigate import (
    Guard,
    PromptOptimizationConfig,
    ReferenceSet,
    SamplingOptions,
    mitigated_generate,
    mitigation_config,
)
from diffmem.mitigate.fitted_gate import FittedGate
from diffmem.mitigate.prompt_optimization import optimize_prompt_embeddings
from diffmem.mitigate.training_similarity import training_similarity
from diffmem.models.tiny import tiny_stable_diffusion_xl, tiny_unet2d
from diffmem.sampling import generate, generation_seed

PROMPTS = ["a red sneaker at the top left", "the zorblax vase poster", "a blue bag"]
SAMPLING = SamplingOptions(num_inference_steps=4, guidance_scale=7.5)


def _seeds(n):
    return [generation_seed(0, i, 0) for i in range(n)]


@pytest.mark.supports("prompt-optimisation", "stable-diffusion")
def test_optimisation_lowers_each_samples_first_step_norm_to_the_target(sd):
    cond = sd.encode(PROMPTS)
    plain = optimize_prompt_embeddings(sd, cond, _seeds(3), PromptOptimizationConfig(max_iterations=0), 4)
    target = min(plain.initial_norm) * 0.5
    result = optimize_prompt_embeddings(sd, cond, _seeds(3), PromptOptimizationConfig(target=target), 4)
    assert result.initial_norm == pytest.approx(plain.initial_norm)
    for before, after, steps in zip(result.initial_norm, result.final_norm, result.iterations):
        assert steps > 0 and after < before
        assert after <= target or steps == 10
    # the start token never moves; everything after it may
    optimized, original = result.cond["prompt_embeds"], cond["prompt_embeds"]
    assert torch.equal(optimized[:, 0], original[:, 0])
    assert not torch.equal(optimized[:, 1:], original[:, 1:])
    assert result.unet_evaluations == 3 * (max(result.iterations) + 2)


def test_only_samples_scoring_above_the_start_are_optimised(sd):
    cond = sd.encode(PROMPTS)
    plain = optimize_prompt_embeddings(sd, cond, _seeds(3), PromptOptimizationConfig(max_iterations=0), 4)
    start = sorted(plain.initial_norm)[1]  # the middle sample: the two lower ones stay put
    config = PromptOptimizationConfig(target=min(plain.initial_norm) * 0.5, start=start)
    result = optimize_prompt_embeddings(sd, cond, _seeds(3), config, 4)
    moved = [before > start for before in plain.initial_norm]
    assert sum(moved) == 1 and [n > 0 for n in result.iterations] == moved
    for i, was_moved in enumerate(moved):
        same = torch.equal(result.cond["prompt_embeds"][i], cond["prompt_embeds"][i])
        assert same != was_moved
    with pytest.raises(DiffmemError, match="start .* must be at least its target"):
        PromptOptimizationConfig(target=1.0, start=0.5)


def test_the_first_step_norm_it_optimises_is_the_detectors_score(sd):
    result = optimize_prompt_embeddings(
        sd, sd.encode(PROMPTS), _seeds(3), PromptOptimizationConfig(max_iterations=0), 4
    )
    scores = noise_norm(sd, PROMPTS, NoiseNormConfig(num_inference_steps=4)).scores
    assert result.initial_norm == pytest.approx(scores.tolist(), rel=1e-5)


def test_each_sample_is_optimised_on_its_own(sd):
    config = PromptOptimizationConfig(target=0.0, max_iterations=3)
    together = optimize_prompt_embeddings(sd, sd.encode(PROMPTS), _seeds(3), config, 4)
    alone = optimize_prompt_embeddings(sd, sd.encode(PROMPTS[1:2]), _seeds(3)[1:2], config, 4)
    torch.testing.assert_close(
        together.cond["prompt_embeds"][1:2], alone.cond["prompt_embeds"], rtol=1e-3, atol=1e-4
    )
    assert together.iterations[1] == alone.iterations[0] == 3


def test_a_reached_target_leaves_sampling_unchanged(sd):
    config = PromptOptimizationConfig(target=1e9)
    mitigated = mitigated_generate(sd, PROMPTS, "prompt_optimization", config, sampling=SAMPLING)
    plain = generate(sd, PROMPTS, num_inference_steps=4, guidance_scale=7.5)
    assert torch.equal(mitigated.images, plain.images)
    assert mitigated.extras["optimization_iterations"] == [0, 0, 0] and mitigated.guided_steps == [0, 0, 0]


def test_optimised_prompts_generate_other_images_and_record_what_happened(sd):
    config = PromptOptimizationConfig(target=0.0, max_iterations=2)
    mitigated = mitigated_generate(
        sd, PROMPTS, "prompt_optimization", config, n_generations=2, sampling=SAMPLING
    )
    plain = generate(sd, PROMPTS, n_generations=2, num_inference_steps=4, guidance_scale=7.5)
    assert mitigated.seeds == plain.seeds and not torch.equal(mitigated.images, plain.images)
    table = mitigated.to_table()
    assert table.num_rows == 6 and set(table.column("method").to_pylist()) == {"prompt_optimization"}
    assert table.column("guided_steps").to_pylist() == [4] * 6
    assert all(a < b for a, b in zip(mitigated.extras["final_norm"], mitigated.extras["initial_norm"]))


def test_with_a_gate_only_generations_that_end_near_a_training_image_are_optimised(sd, tmp_path):
    plain = generate(sd, PROMPTS, num_inference_steps=4, guidance_scale=7.5).images
    noise = torch.rand((20, *plain.shape[1:]), generator=torch.Generator().manual_seed(3))
    reference = ReferenceSet(TrainingSetIndex.build_pixels(torch.cat([plain[1:2], noise]), ["c"] * 21))
    sigma = training_similarity(plain, reference)[0]
    assert sigma[1] > max(sigma[0], sigma[2])  # the second prompt's image is in the training set
    end = float(sigma[1] + max(sigma[0], sigma[2])) / 2
    fingerprint = reference.index.manifest.fingerprint
    FittedGate([981.0, 1.0], [-9.0, end], 0.9, "nl2", fingerprint, 4).save(tmp_path / "gate.json")
    config = PromptOptimizationConfig(
        target=0.0, max_iterations=2, reference=reference, gate=str(tmp_path / "gate.json"), rounds=1
    )
    result = mitigated_generate(sd, PROMPTS, "prompt_optimization", config, sampling=SAMPLING)
    assert result.extras["optimization_iterations"] == [0, 2, 0] and result.guided_steps == [0, 4, 0]
    assert result.extras["optimization_rounds"] == [0, 1, 0]
    assert result.extras["plain_similarity"] == pytest.approx(sigma.tolist(), abs=1e-5)
    assert torch.equal(result.images[0], plain[0]) and torch.equal(result.images[2], plain[2])
    assert not torch.allclose(result.images[1], plain[1], atol=1e-3)
    # every sample drawn plainly, the batch scored and optimised twice, one sample drawn again
    assert result.unet_evaluations == 3 * 4 * 2 + 3 * (2 + 2) + 1 * 4 * 2
    with pytest.raises(DiffmemError, match="needs the training set it was fitted against"):
        PromptOptimizationConfig(gate=str(tmp_path / "gate.json"))
    elsewhere = ReferenceSet(TrainingSetIndex.build_pixels(noise, ["c"] * 20))
    with pytest.raises(DiffmemError, match="fitted against another training-set index"):
        PromptOptimizationConfig(reference=elsewhere, gate=str(tmp_path / "gate.json"))


def test_a_redraw_is_kept_only_if_it_ends_no_nearer_the_training_set(sd, tmp_path):
    config = PromptOptimizationConfig(target=0.0, max_iterations=2)
    optimised = mitigated_generate(sd, PROMPTS, "prompt_optimization", config, sampling=SAMPLING).images
    plain = generate(sd, PROMPTS, num_inference_steps=4, guidance_scale=7.5).images
    for training, kept in ((optimised, plain), (plain, optimised)):  # the redraws are copies / the plain are
        reference = ReferenceSet(TrainingSetIndex.build_pixels(training, ["c"] * 3))
        gate = tmp_path / f"gate-{reference.index.manifest.fingerprint}.json"
        FittedGate([981.0, 1.0], [-9.0, -9.0], 0.9, "nl2", reference.index.manifest.fingerprint, 4).save(gate)
        gated = PromptOptimizationConfig(
            target=0.0, max_iterations=2, reference=reference, gate=str(gate), rounds=1
        )
        result = mitigated_generate(sd, PROMPTS, "prompt_optimization", gated, sampling=SAMPLING)
        assert result.extras["optimization_iterations"] == [2, 2, 2]
        torch.testing.assert_close(result.images, kept)
        assert result.guided_steps == ([0, 0, 0] if kept is plain else [4, 4, 4])


def test_a_redraw_the_gate_still_confirms_is_optimised_on_to_a_deeper_target(sd, tmp_path):
    plain = generate(sd, PROMPTS, num_inference_steps=4, guidance_scale=7.5).images
    noise = torch.rand((20, *plain.shape[1:]), generator=torch.Generator().manual_seed(3))
    reference = ReferenceSet(TrainingSetIndex.build_pixels(torch.cat([plain[1:2], noise]), ["c"] * 21))
    fingerprint = reference.index.manifest.fingerprint
    sigma = training_similarity(plain, reference)[0]

    def run(end, rounds, target=0.0, max_iterations=2):
        FittedGate([981.0, 1.0], [-9.0, end], 0.9, "nl2", fingerprint, 4).save(tmp_path / "gate.json")
        config = PromptOptimizationConfig(
            target=target,
            max_iterations=max_iterations,
            reference=reference,
            gate=str(tmp_path / "gate.json"),
            rounds=rounds,
        )
        return mitigated_generate(sd, PROMPTS, "prompt_optimization", config, sampling=SAMPLING)

    lowest_other = float(max(sigma[0], sigma[2]))
    once = run((float(sigma[1]) + lowest_other) / 2, rounds=1)
    redrawn = float(training_similarity(once.images[1:2], reference)[0])
    assert lowest_other < redrawn < float(sigma[1])
    # a redraw that ends under the gate closes its generation after one round
    cleared = run((redrawn + float(sigma[1])) / 2, rounds=3)
    assert cleared.extras["optimization_rounds"] == [0, 1, 0]
    torch.testing.assert_close(cleared.images, once.images)
    # one the gate still confirms goes on from the embedding it reached, the farthest image kept
    confirmed = run((redrawn + lowest_other) / 2, rounds=3)
    assert confirmed.extras["optimization_rounds"] == [0, 3, 0]
    assert confirmed.extras["optimization_iterations"] == [0, 6, 0]
    assert confirmed.extras["final_norm"][1] < once.extras["final_norm"][1]
    assert float(training_similarity(confirmed.images[1:2], reference)[0]) <= redrawn
    # plain sampling, the batch scored and optimised once, then one sample redrawn and optimised twice more
    assert confirmed.unet_evaluations == 3 * 4 * 2 + 3 * (2 + 2) + 3 * 1 * 4 * 2 + 2 * 1 * (2 + 2)
    # each further round's target is a quarter of the last, and a round ends where it is reached
    first, second = (run(lowest_other + 1e-4, rounds, target=0.08, max_iterations=60) for rounds in (1, 2))
    assert second.extras["optimization_rounds"] == [0, 2, 0]
    assert second.extras["final_norm"][1] <= 0.08 * 0.25 < first.extras["final_norm"][1] <= 0.08
    assert second.extras["optimization_iterations"][1] < 2 * 60
    with pytest.raises(DiffmemError, match="rounds >= 1"):
        PromptOptimizationConfig(rounds=0)


@pytest.mark.supports("prompt-optimisation", "unet2d", refused="no text encoder")
def test_prompt_optimisation_works_on_sdxl_and_refuses_models_without_text():
    sdxl = wrap_pipeline(tiny_stable_diffusion_xl())
    result = mitigated_generate(
        sdxl,
        ["a cat"],
        "prompt_optimization",
        PromptOptimizationConfig(target=0.0, max_iterations=1),
        sampling=SamplingOptions(num_inference_steps=2),
    )
    assert result.extras["optimization_iterations"] == [1] and result.images.shape[0] == 1
    unconditional = wrap_pipeline(tiny_unet2d())
    with pytest.raises(DiffmemError, match="text-conditioned model; unet2d is conditioned on"):
        mitigated_generate(
            unconditional,
            [None],
            "prompt_optimization",
            PromptOptimizationConfig(),
            sampling=SamplingOptions(num_inference_steps=2, guidance_scale=1.0),
        )


def test_guard_mitigates_only_flagged_prompts_and_leaves_the_rest_bit_identical(sd):
    scores = noise_norm(sd, PROMPTS, NoiseNormConfig(num_inference_steps=4)).scores
    order = scores.argsort().tolist()
    threshold = float(scores[order[0]] + scores[order[1]]) / 2  # flags all but the lowest-scoring prompt
    guard = Guard(threshold, NoiseNormConfig(num_inference_steps=4))
    config = PromptOptimizationConfig(target=0.0, max_iterations=2)
    guarded = mitigated_generate(
        sd, PROMPTS, "prompt_optimization", config, n_generations=2, sampling=SAMPLING, guard=guard
    )
    plain = generate(sd, PROMPTS, n_generations=2, num_inference_steps=4, guidance_scale=7.5)
    for row, prompt_index in enumerate(i for i in range(3) for _ in range(2)):
        safe = prompt_index == order[0]
        assert guarded.method[row] == ("none" if safe else "prompt_optimization")
        assert torch.equal(guarded.images[row], plain.images[row]) is safe
        assert guarded.guard_score[row] == pytest.approx(float(scores[prompt_index]))
    assert guarded.unet_evaluations > 0


def test_unknown_mitigations_and_settings_are_refused():
    with pytest.raises(DiffmemError, match="unknown mitigation 'nope'"):
        mitigation_config("nope")
    with pytest.raises(DiffmemError, match="has no setting lr"):
        mitigation_config("prompt_optimization", lr=0.1)
    with pytest.raises(DiffmemError, match="needs the training set"):
        mitigation_config("amg")
    with pytest.raises(DiffmemError, match="learning_rate > 0"):
        PromptOptimizationConfig(learning_rate=0)


def test_the_guard_with_no_mitigation_only_scores(sd):
    guard = Guard(-1.0, NoiseNormConfig(num_inference_steps=4))  # every prompt flagged
    guarded = mitigated_generate(
        sd, PROMPTS, "none", mitigation_config("none"), sampling=SAMPLING, guard=guard
    )
    plain = mitigated_generate(sd, PROMPTS, "none", mitigation_config("none"), sampling=SAMPLING)
    assert torch.equal(guarded.images, plain.images) and guarded.method == ["none"] * 3
    assert (
        guarded.unet_evaluations == plain.unet_evaluations + 3 * 2
    )  # sampled once, plus the first-step scores
    assert all(s is not None for s in guarded.guard_score)

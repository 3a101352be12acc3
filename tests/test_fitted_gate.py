"""The AMG gate fitted to an index (`diffmem index gate`, `amg:gate=FILE`): quantiles of plain sampling's
similarity per step, the file, and the gate as AMG applies it, on a tiny random-weight pipeline."""

import json

import pytest
import torch

from diffmem.adapters import wrap_pipeline
from diffmem.cli.main import run
from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex
from diffmem.mitigate import ReferenceSet, SamplingOptions, mitigated_generate, mitigation_config
from diffmem.mitigate.anti_memorization_guidance import AntiMemorizationGuidance
from diffmem.mitigate.fitted_gate import FittedGate, fit_gate, similarity_trajectories
from diffmem.mitigate.training_similarity import own_training_images, training_similarity
from diffmem.models.tiny import tiny_unet2d
from diffmem.sampling import generate

PROMPTS = ["a red sneaker at the top left", "the zorblax vase poster"]


@pytest.fixture(scope="module")
def pixels(sd):
    own = generate(sd, PROMPTS, num_inference_steps=3).images
    noise = torch.rand((30, *own.shape[1:]), generator=torch.Generator().manual_seed(4))
    images = torch.cat([own, noise])
    return ReferenceSet(TrainingSetIndex.build_pixels(images, ["c"] * len(images)))


def _gate(thresholds, timesteps, fingerprint):
    return FittedGate(
        timesteps=timesteps,
        thresholds=thresholds,
        quantile=0.9,
        measure="nl2",
        index_fingerprint=fingerprint,
        num_samples=4,
    )


def test_the_gate_is_each_steps_quantile_of_the_finite_trajectories(pixels):
    sigmas = torch.tensor([[0.1, 0.5], [0.3, 0.7], [float("nan"), 9.0], [0.2, 0.6]])
    fitted = fit_gate([900.0, 100.0], sigmas, pixels, 0.5)
    assert fitted.thresholds == pytest.approx([0.2, 0.6]) and fitted.num_samples == 3
    assert fitted.index_fingerprint == pixels.index.manifest.fingerprint and fitted.measure == "nl2"
    assert fitted(900.0) == pytest.approx(0.2) and fitted(500.0) == pytest.approx(0.4)  # linear in t
    assert fitted(1000.0) == pytest.approx(0.2) and fitted(0.0) == pytest.approx(0.6)  # held beyond
    assert fitted.origin == pytest.approx(0.2)
    with pytest.raises(DiffmemError, match="between 0 and 1"):
        fit_gate([900.0, 100.0], sigmas, pixels, 1.0)
    with pytest.raises(DiffmemError, match="no plain generation"):
        fit_gate([900.0], torch.tensor([[float("inf")]]), pixels, 0.5)


def test_the_gate_file_round_trips_and_bad_files_are_one_line_errors(tmp_path, pixels):
    fitted = _gate([0.5, 0.7], [981.0, 1.0], pixels.index.manifest.fingerprint)
    fitted.save(tmp_path / "gate.json")
    assert FittedGate.load(tmp_path / "gate.json") == fitted
    (tmp_path / "other.json").write_text(json.dumps({"threshold": 1.0}))
    with pytest.raises(DiffmemError, match="is not an AMG gate file"):
        FittedGate.load(tmp_path / "other.json")
    with pytest.raises(DiffmemError, match="gate file not found"):
        FittedGate.load(tmp_path / "missing.json")
    with pytest.raises(DiffmemError, match="one threshold per timestep"):
        _gate([0.5], [981.0, 1.0], "x")


def test_trajectories_are_what_amg_watches(sd, pixels):
    sampling = SamplingOptions(num_inference_steps=3, guidance_scale=7.5)
    timesteps, sigmas = similarity_trajectories(sd, PROMPTS, pixels, n_generations=2, sampling=sampling)
    assert sigmas.shape == (4, 3) and len(timesteps) == 3 and timesteps == sorted(timesteps, reverse=True)
    watched = mitigated_generate(
        sd,
        PROMPTS,
        "amg",
        mitigation_config("amg", reference=pixels, gate="never"),
        n_generations=2,
        sampling=sampling,
    )
    assert sigmas.max(1).values.tolist() == pytest.approx(watched.extras["amg_max_similarity"])


def test_amg_opens_a_fitted_gate_where_the_similarity_is_above_it(sd, pixels, tmp_path):
    sampling = SamplingOptions(num_inference_steps=1, guidance_scale=7.5)
    timesteps, sigmas = similarity_trajectories(sd, PROMPTS, pixels, sampling=sampling)
    assert sigmas[0, 0] != sigmas[1, 0]
    fit_gate(timesteps, sigmas, pixels, 0.5).save(tmp_path / "gate.json")  # between the two samples
    config = mitigation_config("amg", reference=pixels, gate=str(tmp_path / "gate.json"))
    guided = mitigated_generate(sd, PROMPTS, "amg", config, sampling=sampling)
    assert guided.guided_steps == [int(sigmas[0, 0] > sigmas[1, 0]), int(sigmas[1, 0] > sigmas[0, 0])]
    shifted = mitigation_config("amg", reference=pixels, gate=str(tmp_path / "gate.json"), gate_shift=0.25)
    assert shifted.c3_origin == pytest.approx(config.c3_origin + 0.25)
    assert AntiMemorizationGuidance(sd, shifted, 2).config.lambda_t(500.0) == pytest.approx(
        float(sigmas[:, 0].mean()) + 0.25
    )


def test_a_sample_whose_gate_opened_is_checked_at_every_later_step(sd, pixels, tmp_path):
    sampling = SamplingOptions(num_inference_steps=5, guidance_scale=7.5)
    timesteps, sigmas = similarity_trajectories(sd, PROMPTS, pixels, sampling=sampling)
    first = int(sigmas[1, 0] > sigmas[0, 0])  # the sample above the gate at step 0; closed after it
    thresholds = [float(sigmas[:, 0].mean())] + [1e6] * 4
    _gate(thresholds, timesteps, pixels.index.manifest.fingerprint).save(tmp_path / "gate.json")
    gate = str(tmp_path / "gate.json")
    config = mitigation_config("amg", reference=pixels, gate=gate, check_every=3, check_margin=0.0)
    guided = mitigated_generate(sd, PROMPTS, "amg", config, sampling=sampling)
    assert guided.guided_steps[first] == 1 and guided.guided_steps[1 - first] == 0
    assert guided.extras["amg_checks"][first] == 5 and guided.extras["amg_checks"][1 - first] == 2  # 0, 3
    # within the margin of the gate at every check (but never above it): checked at every step too
    config = mitigation_config("amg", reference=pixels, gate=gate, check_every=3, check_margin=1e7)
    near = mitigated_generate(sd, PROMPTS, "amg", config, sampling=sampling)
    assert near.guided_steps == guided.guided_steps and near.extras["amg_checks"] == [5, 5]


def test_a_gate_fitted_to_another_index_or_not_a_gate_is_refused(tmp_path, pixels):
    _gate([0.5, 0.7], [981.0, 1.0], "another index").save(tmp_path / "gate.json")
    with pytest.raises(DiffmemError, match="fitted against another training-set index"):
        mitigation_config("amg", reference=pixels, gate=str(tmp_path / "gate.json"))
    with pytest.raises(DiffmemError, match="unknown AMG gate 'parabola'"):
        mitigation_config("amg", reference=pixels, gate="parabola")


def test_index_gate_command_fits_a_gate_that_generate_uses(tmp_path, pixels, capsys):
    pixels.index.save(tmp_path / "index")
    prompts = tmp_path / "safe.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    gate = tmp_path / "gate.json"
    args = ["index", "gate", str(tmp_path / "index"), "--model", "builtin:tiny-sd", "--prompts", str(prompts)]
    common = ["--num-inference-steps", "2", "--n-generations", "2"]
    assert run([*args, *common, "--quantile", "0.75", "--out", str(gate)]) == 0
    fitted = FittedGate.load(gate)
    assert fitted.quantile == 0.75 and len(fitted.thresholds) == 2 and fitted.num_samples == 4
    assert f"amg:gate={gate}" in capsys.readouterr().out
    out = tmp_path / "generated"
    generate_args = ["generate", *PROMPTS, "--steps", "2", "--index", str(tmp_path / "index")]
    assert run([*generate_args, "--mitigation", f"amg:gate={gate}", "--out", str(out)]) == 0
    assert run([*args, "--quantile", "1.5", "--out", str(gate)]) == 2
    assert "--quantile must be between 0 and 1" in capsys.readouterr().err
    assert run([*args, "--out", str(tmp_path / "gate.txt")]) == 2
    assert "--out must be a .json file" in capsys.readouterr().err
    assert run([*args[:5], "--out", str(gate)]) == 2
    assert "give --prompts" in capsys.readouterr().err


def test_an_unconditional_model_fits_its_gate_without_prompts(tmp_path):
    unconditional = wrap_pipeline(tiny_unet2d())
    images = generate(unconditional, [None], n_generations=2, num_inference_steps=2).images
    TrainingSetIndex.build_pixels(images, [""] * 2).save(tmp_path / "index")
    gate = tmp_path / "gate.json"
    args = ["index", "gate", str(tmp_path / "index"), "--model", "builtin:tiny-unet2d"]
    assert run([*args, "--n-generations", "3", "--num-inference-steps", "2", "--out", str(gate)]) == 0
    assert FittedGate.load(gate).num_samples == 3


def test_a_training_caption_is_measured_without_its_own_training_images(sd):
    """A prompt's own row and exact copies of its image are left out; other prompts keep every row."""
    own = generate(sd, PROMPTS, num_inference_steps=3).images
    noise = torch.rand((30, *own.shape[1:]), generator=torch.Generator().manual_seed(4))
    captions = [*PROMPTS, "the same vase under another caption", *["c"] * len(noise)]
    reference = ReferenceSet(TrainingSetIndex.build_pixels(torch.cat([own, own[1:], noise]), captions))
    excluded = own_training_images(reference.index, [PROMPTS[1], PROMPTS[0], "never trained"])
    assert excluded.tolist() == [[1, 2], [0, -1], [-1, -1]]
    assert own_training_images(reference.index, ["never trained"]).shape == (1, 0)
    kept, _ = training_similarity(own, reference)
    left_out, nearest = training_similarity(own, reference, exclude=excluded[:2].flip(0))
    assert kept.tolist() == pytest.approx([0.0, 0.0], abs=1e-5)  # each image is its own row
    assert (left_out < kept - 0.05).all() and nearest[0] != 0 and nearest[1] not in (1, 2)
    sampling = SamplingOptions(num_inference_steps=3, guidance_scale=7.5)
    _, sigmas = similarity_trajectories(sd, PROMPTS, reference, sampling=sampling)
    assert sigmas[:, -1].tolist() == pytest.approx(left_out.tolist(), abs=1e-3)
    assert fit_gate([1.0], sigmas[:, -1:], reference, 0.5).own_images_left_out

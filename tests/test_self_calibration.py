"""Self-calibration: a model's profile from ordinary prompts, cached by its hash, and the defaults that
scan, the guard, prompt optimisation and AMG read from it."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from diffmem.calibration.cache import profile_path
from diffmem.calibration.profile import REFERENCE_SCORES, ModelProfile
from diffmem.calibration.reference_prompts import neutral_prompts, single_copy_captions
from diffmem.cli.main import run
from diffmem.detect.calibration import Calibration
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.detect.registry import config_settings
from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex
from diffmem.models.source import ModelSource
from diffmem.workflows import calibrate as calibrate_workflow
from diffmem.workflows.calibrate import ProfileConfig, calibrate_model, calibrated_settings, model_profile
from diffmem.workflows.runtime import Runtime
from diffmem.workflows.scan import ScanConfig, scan


def profile(scores, **fields) -> ModelProfile:
    settings = config_settings(NoiseNormConfig())
    return ModelProfile("model-hash", "neutral", settings, sorted(scores), **fields)


def full_profile(low: float, high: float) -> ModelProfile:
    """A profile with as many scores as one measured now draws."""
    return profile(np.linspace(low, high, REFERENCE_SCORES).tolist())


def test_the_profile_places_the_threshold_and_the_target_among_ordinary_scores():
    scores = np.linspace(0.0, 1.0, 201).tolist()
    made = profile(scores, target_fpr=0.05)
    assert np.mean(np.array(scores) > made.detection_threshold) == pytest.approx(0.05, abs=0.006)
    assert made.prompt_target == pytest.approx(0.025)  # a quarter of the ordinary 10% quantile
    assert made.prompt_start() == pytest.approx(0.95)
    calibration = made.calibration()
    assert calibration.threshold == made.detection_threshold and calibration.num_prompts == 201
    calibration.check("noise_norm", config_settings(NoiseNormConfig()), "model-hash")
    with pytest.raises(DiffmemError, match="settings differ"):
        calibration.check("noise_norm", config_settings(NoiseNormConfig(n_generations=4)), "model-hash")


def test_a_profile_file_round_trips_and_junk_is_refused(tmp_path):
    made = profile([0.3, 0.1, 0.2])
    made.save(tmp_path / "p.json")
    assert ModelProfile.load(tmp_path / "p.json") == made
    (tmp_path / "other.json").write_text(json.dumps({"format": "diffmem.amg_gate"}))
    with pytest.raises(DiffmemError, match="not a model profile"):
        ModelProfile.load(tmp_path / "other.json")
    # a profile cached with the policy it was once stored with follows today's policy
    stored = json.loads((tmp_path / "p.json").read_text()) | {"prompt_quantile": 0.5, "start_quantile": 0.5}
    (tmp_path / "cached.json").write_text(json.dumps(stored))
    cached = ModelProfile.load(tmp_path / "cached.json")
    assert cached == made and cached.prompt_target == made.prompt_target
    record = json.loads((tmp_path / "p.json").read_text()) | {"scores": [0.1, float("nan")]}
    (tmp_path / "nan.json").write_text(json.dumps(record))
    with pytest.raises(DiffmemError, match="finite score"):
        ModelProfile.load(tmp_path / "nan.json")


def test_the_bundled_neutral_prompts_are_many_and_distinct():
    prompts = neutral_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts) and all(p.strip() for p in prompts)


def test_single_copy_captions_leave_out_duplicated_and_empty_captions():
    import torch

    captions = ["a", "b", "b", "c", "", "d"]
    index = TrainingSetIndex.build_pixels(torch.rand(6, 3, 4, 4), captions)
    assert sorted(single_copy_captions(index, 10)) == ["a", "c", "d"]
    assert len(single_copy_captions(index, 2)) == 2


def test_calibration_is_measured_once_and_read_from_the_cache(tmp_path, monkeypatch):
    prompts = tmp_path / "ordinary.txt"
    prompts.write_text("\n".join(f"a photo of thing number {i}" for i in range(24)))
    made = calibrate_model(ProfileConfig("builtin:tiny-sd", prompts), Runtime())
    source = ModelSource.resolve("builtin:tiny-sd")
    assert profile_path(source.identity).exists() and made.reference == str(prompts)
    # 24 prompts give the profile's scores at 43 seeds each, one generation a score
    assert made.generations_per_prompt == 43 and len(made.scores) == 24 * 43 >= REFERENCE_SCORES
    assert made.scores == sorted(made.scores) and made.calibration().num_prompts == 24
    runtime = Runtime()
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    scanned = noise_norm(denoiser, prompts.read_text().splitlines(), NoiseNormConfig()).scores
    assert all(np.isclose(made.scores, float(s), rtol=1e-5).any() for s in scanned)  # a scan's first seed
    monkeypatch.setattr(
        calibrate_workflow, "single_generation_scores", lambda *a, **k: pytest.fail("measured again")
    )
    said = []
    monkeypatch.setattr(calibrate_workflow.log, "warning", lambda message, *args: said.append(message % args))
    assert model_profile(source, Runtime()) == made
    assert not said  # read from the cache, and made from the user's own prompts, not the neutral ones


def test_a_scan_without_a_calibration_flags_by_the_models_profile(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog on a hill\n")
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("\n".join(f"an ordinary prompt {i}" for i in range(16)))
    made = calibrate_model(ProfileConfig("builtin:tiny-sd-v", ordinary), Runtime())
    result = scan(ScanConfig(model="builtin:tiny-sd-v", prompts=prompts), tmp_path / "scan")
    assert result.threshold == pytest.approx(made.detection_threshold)
    other = scan(
        ScanConfig(model="builtin:tiny-sd-v", prompts=prompts, settings={"n_generations": 2}), tmp_path / "s2"
    )
    assert other.threshold is None  # the profile measured n = 1


def test_scan_and_explain_given_the_training_set_flag_by_the_profile_against_it(sd, tmp_path, monkeypatch):
    from diffmem.sampling import generate

    monkeypatch.setenv("DIFFMEM_CACHE_DIR", str(tmp_path / "cache"))  # no profile another test made
    said = []
    monkeypatch.setattr(calibrate_workflow.log, "warning", lambda message, *args: said.append(message % args))
    captions = [f"a training caption number {i}" for i in range(12)]
    images = generate(sd, captions, num_inference_steps=4).images
    TrainingSetIndex.build_pixels(images, captions).save(tmp_path / "index")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog on a hill\n")
    config = ScanConfig(model="builtin:tiny-sd", prompts=prompts, index=tmp_path / "index")
    result = scan(config, tmp_path / "scan")
    source = ModelSource.resolve("builtin:tiny-sd")
    assert not any("bundled neutral prompts" in line for line in said)
    against = model_profile(source, Runtime(), index=tmp_path / "index")  # cached by the scan
    assert against.reference == "index captions" and result.config["index"] == str(tmp_path / "index")
    assert result.threshold == pytest.approx(against.detection_threshold)
    assert result.threshold != pytest.approx(model_profile(source, Runtime()).detection_threshold)
    assert any("bundled neutral prompts" in line for line in said)  # a profile without the training set
    with pytest.raises(DiffmemError, match="--encoder goes with an embedding index"):
        scan(ScanConfig(model="builtin:tiny-sd", prompts=prompts, encoder=tmp_path / "enc"), tmp_path / "s2")
    assert not (tmp_path / "s2").exists()  # refused before any work
    # prompt optimisation given the same index confirms copies by the profile's gate, from its quantile
    from diffmem.mitigate.fitted_gate import FittedGate

    args = ["generate", "a cat", "--model", "builtin:tiny-sd", "--index", str(tmp_path / "index")]
    assert (
        run([*args, "--mitigation", "prompt_optimization", "--steps", "4", "--out", str(tmp_path / "g")]) == 0
    )
    settings = json.loads((tmp_path / "g" / "summary.json").read_text())["config"]["mitigation_settings"]
    start = against.prompt_start(FittedGate.load(Path(against.gate)))
    assert settings["gate"] == against.gate and settings["start"] == pytest.approx(
        max(start, settings["target"])
    )
    assert start < against.prompt_start()  # the gate's 90% quantile, not the 95% the score alone starts from
    # explain flags by the same profile
    args = ["explain", "a cat", "--model", "builtin:tiny-sd", "--index", str(tmp_path / "index")]
    assert run([*args, "--attribute-to", "prompt_embeds", "--out", str(tmp_path / "explain")]) == 0
    explained = json.loads((tmp_path / "explain" / "explanation.json").read_text())
    assert explained["threshold"] == pytest.approx(against.detection_threshold)


def test_mitigations_read_their_scale_from_the_profile_unless_given_or_preset_paper():
    made = profile(np.linspace(0.2, 1.2, 101).tolist())
    # a quarter of the ordinary 10% quantile, from their 95% quantile on, stopping there within 100 iterations
    calibrated = {"target": pytest.approx(0.075), "start": pytest.approx(1.15), "max_iterations": 100}
    assert calibrated_settings("prompt_optimization", {}, made) == calibrated
    assert calibrated_settings("prompt_optimization", {"target": 2.0}, made) == {"target": 2.0}
    assert calibrated_settings("prompt_optimization", {"start": 0.9}, made)["start"] == 0.9
    # the paper's target is a point on the uncentred norm's scale
    assert calibrated_settings("prompt_optimization", {"preset": "paper"}, made) == {"centered": False}
    assert calibrated_settings("gni", {}, made) == {}
    with pytest.raises(DiffmemError, match="preset must be one of"):
        calibrated_settings("amg", {"preset": "tuned"}, made)


def test_the_profiles_gate_is_taken_only_for_the_index_it_was_fitted_to(tmp_path):
    import torch

    from diffmem.mitigate.fitted_gate import FittedGate
    from diffmem.mitigate.training_similarity import ReferenceSet

    index = TrainingSetIndex.build_pixels(torch.rand(4, 3, 4, 4), ["a", "b", "c", "d"])
    gate = str(tmp_path / "gate.json")
    FittedGate([981.0, 1.0], [0.3, 0.6], 0.8, "nl2", index.manifest.fingerprint, 64).save(Path(gate))
    scores = np.linspace(0.2, 1.2, 101).tolist()
    fitted = profile(scores, gate=gate, index_fingerprint=index.manifest.fingerprint)
    excess = {"c3_rule": "excess"}
    assert calibrated_settings("amg", {}, fitted, ReferenceSet(index)) == {"gate": gate, **excess}
    elsewhere = profile(scores, gate=gate, index_fingerprint="another index")
    assert calibrated_settings("amg", {}, elsewhere, ReferenceSet(index)) == excess
    assert calibrated_settings("amg", {"c3": 50}, elsewhere, ReferenceSet(index)) == {"c3": 50}
    assert calibrated_settings("amg", {"preset": "paper"}, fitted, ReferenceSet(index)) == {}
    # prompt optimisation confirms a copy by the same gate, and so starts from the gate's quantile of
    # ordinary scores, not the 95%; only against the index the gate was fitted to
    confirmed = calibrated_settings("prompt_optimization", {}, fitted, ReferenceSet(index))
    assert confirmed["gate"] == gate and confirmed["start"] == pytest.approx(1.0)
    unconfirmed = calibrated_settings("prompt_optimization", {}, elsewhere, ReferenceSet(index))
    assert "gate" not in unconfirmed and unconfirmed["start"] == pytest.approx(1.15)
    paper = calibrated_settings("prompt_optimization", {"preset": "paper"}, fitted, ReferenceSet(index))
    assert "gate" not in paper


def test_the_calibrate_command_writes_a_calibration_the_other_commands_take(tmp_path, capsys):
    prompts = tmp_path / "ordinary.txt"
    prompts.write_text("\n".join(f"an everyday scene {i}" for i in range(20)))
    out = tmp_path / "calibration.json"
    assert run(["calibrate", "--model", "builtin:tiny-sd", "--prompts", str(prompts), "--out", str(out)]) == 0
    made = model_profile(ModelSource.resolve("builtin:tiny-sd"))  # the one just cached
    said = f"prompt optimisation's target {made.prompt_target:.4g} from {made.prompt_start():.4g}"
    assert said in capsys.readouterr().out
    Calibration.load(out).check("noise_norm", config_settings(NoiseNormConfig()), "builtin:tiny-sd")
    assert run(["calibrate", "--model", "builtin:tiny-sd", "--n-generations", "2"]) != 0
    assert "needs --prompts and --out" in capsys.readouterr().err


def test_only_settings_left_open_are_taken_from_the_profile():
    from diffmem.workflows.calibrate import left_to_profile

    assert left_to_profile("prompt_optimization", {}) == {"target"}
    assert left_to_profile("prompt_optimization", {"target": 0.4}) == set()
    assert left_to_profile("amg", {"c3_scale": 2}) == {"gate"}
    assert left_to_profile("amg", {"preset": "paper"}) == left_to_profile("gni", {}) == set()


def test_a_mitigation_whose_settings_are_all_given_never_calibrates(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate_workflow, "calibrate_model", lambda *a, **k: pytest.fail("calibrated"))
    prompt = "the droquo dulyr poster: a red shirt"
    args = ["generate", prompt, "--model", "builtin:lab-micro", "--steps", "2", "--out"]
    assert run([*args, str(tmp_path / "a"), "--mitigation", "amg:gate=always"]) == 0
    assert run([*args, str(tmp_path / "b"), "--mitigation", "prompt_optimization:preset=paper"]) == 0
    assert run([*args, str(tmp_path / "c"), "--mitigation", "amg:gate_shift=abc"]) == 2  # before any work


def test_a_cached_gate_fitted_with_its_prompts_own_images_in_is_fitted_again(tmp_path, monkeypatch):
    import torch

    from diffmem.mitigate.fitted_gate import FittedGate

    index = TrainingSetIndex.build_pixels(torch.rand(4, 3, 8, 8), ["a", "b", "c", "d"])
    index.save(tmp_path / "index")
    source, fingerprint = ModelSource.resolve("builtin:tiny-sd"), index.manifest.fingerprint
    gate = FittedGate([1.0], [0.5], 0.9, "nl2", fingerprint, 4, own_images_left_out=False)
    gate.save(tmp_path / "gate.json")
    cached = replace(full_profile(0.1, 0.2), model_hash=source.identity)
    cached = replace(cached, gate=str(tmp_path / "gate.json"), index_fingerprint=fingerprint)
    cached.save(profile_path(source.identity, fingerprint))
    measured = []
    monkeypatch.setattr(calibrate_workflow, "calibrate_model", lambda *a, **k: measured.append(1) or cached)
    model_profile(source, Runtime(), index=tmp_path / "index")
    assert measured == [1]  # the earlier rule's gate is not reused
    replace(gate, own_images_left_out=True).save(tmp_path / "gate.json")
    assert model_profile(source, Runtime(), index=tmp_path / "index") == cached and measured == [1]


def test_a_cached_profile_measured_another_way_is_measured_again(tmp_path, monkeypatch):
    source = ModelSource.resolve("builtin:tiny-sd")
    earlier = dict(config_settings(NoiseNormConfig()), base_seed=7)
    del earlier["centered"]  # a profile cached before the noise norm was centred
    replace(profile([0.1, 0.2]), model_hash=source.identity, settings=earlier).save(
        profile_path(source.identity)
    )
    measured = []
    fresh = replace(full_profile(0.3, 0.4), model_hash=source.identity)
    monkeypatch.setattr(calibrate_workflow, "calibrate_model", lambda *a, **k: measured.append(1) or fresh)
    assert model_profile(source, Runtime()) == fresh and measured == [1]
    replace(fresh, settings=dict(fresh.settings, base_seed=7)).save(profile_path(source.identity))
    assert model_profile(source, Runtime()) == replace(fresh, settings=dict(fresh.settings, base_seed=7))
    assert measured == [1]  # any seed will do
    replace(fresh, scores=fresh.scores[:256]).save(profile_path(source.identity))
    assert model_profile(source, Runtime()) == fresh and measured == [1, 1]  # too few draws for its tail

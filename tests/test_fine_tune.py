"""Fine-tuning with training policies on accelerate: the shipped lab model on a micro-lab dataset, a few
steps on CPU — resume, policy checks, the filter's masking, subsets and the CLI."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from diffmem.adapters import load_denoiser
from diffmem.cli.main import run
from diffmem.errors import DiffmemError
from diffmem.lab.dataset import LabConfig
from diffmem.models.source import shipped_directory
from diffmem.train.fine_tune import FineTuneConfig, fine_tune, training_magnitudes

MODEL = shipped_directory("builtin:lab-micro") / "model"
QUICK = FineTuneConfig(steps=4, batch_size=4, lr=1e-3, checkpoint_every=2, ema_decay=0.9)
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def data_dir(micro_lab_data):
    return micro_lab_data


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    assert fine_tune(MODEL, data_dir, out, QUICK, progress=False).complete
    return out


def _whole_and_resumed(data_dir, tmp_path, config: FineTuneConfig) -> tuple[dict, dict]:
    """The records of a run done in one call and of the same run resumed one step a call."""
    assert fine_tune(MODEL, data_dir, tmp_path / "whole", config, progress=False).complete
    while not fine_tune(
        MODEL, data_dir, tmp_path / "resumed", config, time_budget_s=0.0, progress=False
    ).complete:
        pass
    return tuple(json.loads((tmp_path / d / "fine_tune.json").read_text()) for d in ("whole", "resumed"))


def _predicting(tmp_path, prediction_type: str):
    """A copy of the micro model whose scheduler says it predicts ``prediction_type`` (same weights)."""
    model = tmp_path / prediction_type
    shutil.copytree(MODEL, model)
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(
        json.dumps({**json.loads(scheduler.read_text()), "prediction_type": prediction_type})
    )
    return model


def _unet(directory):
    return load_file(directory / "model" / WEIGHTS)


@pytest.mark.supports("fine-tuning", "stable-diffusion")
def test_a_fine_tuned_model_loads_and_records_how_it_was_made(uninterrupted):
    denoiser = load_denoiser(uninterrupted / "model")
    assert denoiser.family == "stable-diffusion"
    record = json.loads((uninterrupted / "fine_tune.json").read_text())
    assert record["config"]["steps"] == 4 and record["images"] > 0 and record["drop_rate"] is None
    before = load_file(MODEL / WEIGHTS)
    after = _unet(uninterrupted)
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before)
    assert not (uninterrupted / "checkpoint").exists()


def test_an_interrupted_run_resumes_to_the_same_weights(data_dir, uninterrupted, tmp_path):
    out, calls = tmp_path / "resumed", 0
    while not fine_tune(MODEL, data_dir, out, QUICK, time_budget_s=0.0, progress=False).complete:
        calls += 1
    assert calls == 3  # one step a call, the fourth completes
    expected, resumed = _unet(uninterrupted), _unet(out)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)


def test_the_filter_drop_rate_and_time_cover_every_call_of_a_resumed_run(data_dir, tmp_path):
    config = FineTuneConfig(**{**QUICK.__dict__, "policies": {"filter": {"threshold": 2.0}}})
    whole, resumed = _whole_and_resumed(data_dir, tmp_path, config)
    assert 0 < whole["drop_rate"] < 1 and resumed["drop_rate"] == whole["drop_rate"]
    assert [step for step, _ in whole["drop_log"]] == [2, 4]  # a window closes at every checkpoint
    assert [step for step, _ in resumed["drop_log"]] == [1, 2, 3, 4]  # each call checkpoints its one step
    assert sum(rate for _, rate in resumed["drop_log"]) / 4 == pytest.approx(resumed["drop_rate"])
    assert whole["wall_time_s"] > 0 and resumed["wall_time_s"] > 0


def test_a_quantile_threshold_is_measured_once_on_the_starting_model(data_dir, tmp_path):
    policies = {"filter": {"quantile": 0.5, "calibration_batches": 4}}
    config = FineTuneConfig(**{**QUICK.__dict__, "policies": policies})
    whole, resumed = _whole_and_resumed(data_dir, tmp_path, config)
    # every call of the resumed run goes on with the first call's threshold, not one of its updated model
    assert resumed["filter_threshold"] == whole["filter_threshold"] != 2.0
    assert 0 < whole["drop_rate"] < 1 and resumed["drop_rate"] == whole["drop_rate"]


def test_training_magnitudes_are_the_filters_view_of_the_training_batches(data_dir):
    table = training_magnitudes(MODEL, data_dir, batches=2, batch_size=8, seed=3)
    again = training_magnitudes(MODEL, data_dir, batches=2, batch_size=8, seed=3)
    assert table.num_rows == 16 and table.equals(again)
    assert set(table["group"].to_pylist()) <= {"memorized", "duplicated_image", "unique"}
    assert all(0 <= t < 1000 for t in table["t"].to_pylist())
    assert min(table["magnitude"].to_pylist()) > 0


def test_a_velocity_model_fine_tunes_and_its_filter_measures_the_noise_predictions(data_dir, tmp_path):
    model = _predicting(tmp_path, "v_prediction")
    # the same weights read as v: eps_c - eps_u = sqrt(abar_t) (v_c - v_u)
    as_v = training_magnitudes(model, data_dir, batches=1, batch_size=8, seed=3)
    as_eps = training_magnitudes(MODEL, data_dir, batches=1, batch_size=8, seed=3)
    alpha_bar = DDPMScheduler.from_pretrained(MODEL / "scheduler").alphas_cumprod
    expected = alpha_bar[as_eps["t"].to_pylist()].sqrt() * torch.tensor(as_eps["magnitude"].to_pylist())
    assert as_v["t"].equals(as_eps["t"])
    torch.testing.assert_close(torch.tensor(as_v["magnitude"].to_pylist()), expected, rtol=1e-4, atol=1e-5)
    config = replace(QUICK, policies={"filter": {"threshold": 1e9}})
    assert fine_tune(model, data_dir, tmp_path / "run", config, progress=False).complete
    assert json.loads((tmp_path / "run" / "fine_tune.json").read_text())["prediction_type"] == "v_prediction"
    assert load_denoiser(tmp_path / "run" / "model").prediction_type == "v_prediction"
    assert not torch.equal(
        _unet(tmp_path / "run")["conv_out.bias"].float(), load_file(model / WEIGHTS)["conv_out.bias"].float()
    )


def test_an_unknown_prediction_type_is_refused_before_training(data_dir, tmp_path):
    model = _predicting(tmp_path, "flow")
    with pytest.raises(
        DiffmemError, match="the model predicts 'flow'; fine-tuning supports epsilon, v_prediction"
    ):
        fine_tune(model, data_dir, tmp_path / "run", QUICK, progress=False)
    assert not (tmp_path / "run" / "model").exists()


def test_resuming_with_another_policy_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    assert not fine_tune(MODEL, data_dir, out, QUICK, time_budget_s=0.0, progress=False).complete
    other = FineTuneConfig(**{**QUICK.__dict__, "policies": {"filter": {"threshold": 5.0}}})
    with pytest.raises(DiffmemError, match=r"other settings \(policies\)"):
        fine_tune(MODEL, data_dir, out, other, progress=False)


def test_a_filter_that_drops_every_sample_makes_no_update(data_dir, tmp_path):
    config = FineTuneConfig(steps=2, batch_size=4, lr=1e-3, policies={"filter": {"threshold": 1e-6}})
    status = fine_tune(MODEL, data_dir, tmp_path / "run", config, progress=False)
    assert status.complete and status.drop_rate == 1.0
    before, after = load_file(MODEL / WEIGHTS), _unet(tmp_path / "run")
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before)


def test_ambient_and_caption_policies_on_a_subset(data_dir, tmp_path):
    policies = {"ambient": {"sigma_n": 0.5}, "captions": {"p": 0.5}, "filter": {"threshold": 100.0}}
    config = FineTuneConfig(steps=2, batch_size=4, max_images=40, policies=policies)
    status = fine_tune(MODEL, data_dir, tmp_path / "run", config, progress=False)
    record = json.loads((tmp_path / "run" / "fine_tune.json").read_text())
    assert status.drop_rate == 0.0 and record["images"] == 40 and 0 < record["ambient_t_n"] < 1000


def test_bad_policies_are_one_line_errors(data_dir, tmp_path):
    with pytest.raises(DiffmemError, match="unknown policy 'dedupe'"):
        FineTuneConfig(policies={"dedupe": {}})
    with pytest.raises(DiffmemError, match="policy 'ambient' has no setting t"):
        FineTuneConfig(policies={"ambient": {"t": 3}})
    with pytest.raises(DiffmemError, match="outside the schedule"):
        fine_tune(
            MODEL, data_dir, tmp_path / "x", FineTuneConfig(steps=1, policies={"ambient": {"sigma_n": 1e5}})
        )


def test_train_command(data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--model", str(MODEL), "--data", str(data_dir), "--out", str(out), "--steps", "2"]
    assert run([*args, "--batch-size", "2", "--policy", "filter:threshold=100"]) == 0
    assert "fine-tuned" in capsys.readouterr().out and (out / "model" / "model_index.json").is_file()
    assert run([*args, "--policy", "ambient", "--policy", "ambient"]) == 2
    assert "given twice" in capsys.readouterr().err
    quick = ["train", "--data", str(data_dir), "--steps", "1", "--batch-size", "2"]
    assert run([*quick, "--model", "builtin:lab-micro", "--out", str(tmp_path / "shipped")]) == 0
    record = json.loads((tmp_path / "shipped" / "fine_tune.json").read_text())
    assert record["model"] == str(MODEL)  # a shipped model by its name
    assert run([*quick, "--model", "builtin:tiny-sd", "--out", str(tmp_path / "random")]) == 2
    assert (
        "is not a diffusers pipeline: fine-tuning starts from a pipeline directory" in capsys.readouterr().err
    )


def test_deduplication_keeps_each_image_once_and_reports_it(data_dir, tmp_path):
    config = FineTuneConfig(steps=1, batch_size=2, policies={"dedup": {"max_l2": 0.0}})
    assert fine_tune(MODEL, data_dir, tmp_path / "run", config, progress=False).complete
    record = json.loads((tmp_path / "run" / "fine_tune.json").read_text())["deduplication"]
    config_micro = LabConfig.micro()
    repeated = config_micro.num_memorized * (
        config_micro.memorized_repeats - 1
    ) + config_micro.num_duplicated_image * (config_micro.duplicated_image_repeats - 1)
    assert record["rows_before"] - record["rows_after"] == repeated  # exact repeats collapse to one row
    assert record["images_dropped"] == 0  # distinct scenes are never within l2 = 0 of each other


def test_near_duplicate_images_are_dropped():
    from diffmem.train.deduplication import DeduplicationConfig, deduplicate

    base = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    images = torch.cat([base, base[:2] + 0.001])  # images 5 and 6 nearly copy 0 and 1
    result = deduplicate(images, [0, 1, 2, 3, 4, 5, 6, 6], DeduplicationConfig(max_l2=0.01))
    assert result.kept_images == [0, 1, 2, 3, 4] and result.images_dropped == 2
    assert (result.rows_before, result.rows_after) == (8, 5)


@pytest.mark.supports("fine-tuning", "unet2d")
@pytest.mark.parametrize("class_conditional", [True, False])
def test_unet2d_pipelines_train_on_pixels(data_dir, tmp_path, class_conditional):
    from diffmem.models.tiny import tiny_unet2d

    model = tmp_path / "unet2d"
    tiny_unet2d(class_conditional=class_conditional).save_pretrained(model)
    policies = {"ambient": {"sigma_n": 0.5}} | ({"filter": {"threshold": 100.0}} if class_conditional else {})
    config = FineTuneConfig(steps=2, batch_size=4, lr=1e-3, policies=policies)
    status = fine_tune(model, data_dir, tmp_path / "run", config, progress=False)
    assert status.complete and status.drop_rate == (0.0 if class_conditional else None)
    denoiser = load_denoiser(tmp_path / "run" / "model")
    assert denoiser.conditioning == ("class" if class_conditional else "none")
    before = load_file(model / WEIGHTS)
    assert any(not torch.equal(before[k], v) for k, v in _unet(tmp_path / "run").items())


def test_policies_that_need_conditioning_refuse_an_unconditional_model(data_dir, tmp_path):
    from diffmem.models.tiny import tiny_unet2d

    model = tmp_path / "unet2d"
    tiny_unet2d().save_pretrained(model)
    for policy, message in (
        ("filter", "this model is unconditional"),
        ("captions", "needs a text-to-image model"),
    ):
        with pytest.raises(DiffmemError, match=message):
            fine_tune(
                model,
                data_dir,
                tmp_path / policy,
                FineTuneConfig(steps=1, policies={policy: {}}),
                progress=False,
            )


def test_two_processes_draw_their_own_rows_and_resume_to_the_same_weights(
    data_dir, tmp_path, accelerate_launch
):
    """`accelerate launch` with two CPU processes (gloo): every process trains on its own rows (so the
    weights differ from one process's run), checkpoints together and resumes exactly; the filter's drop
    rate is summed over both."""
    train = ["-m", "diffmem.cli.main", "train", "--model", str(MODEL), "--data", str(data_dir)]
    train += ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--ema-decay", "0.9"]
    train += ["--checkpoint-every", "1", "--policy", "filter:threshold=100"]
    assert accelerate_launch(*train, "--out", str(tmp_path / "two")).count("fine-tuned") == 1
    record = json.loads((tmp_path / "two" / "fine_tune.json").read_text())
    assert record["processes"] == 2 and record["drop_rate"] == 0.0
    calls = 0
    resume = [*train, "--out", str(tmp_path / "resumed"), "--time-budget-s", "0"]
    while "fine-tuned" not in accelerate_launch(*resume):
        calls += 1
    assert calls == 1  # one step a call, the second completes
    two, resumed = _unet(tmp_path / "two"), _unet(tmp_path / "resumed")
    for key in two:
        torch.testing.assert_close(resumed[key], two[key], rtol=1e-5, atol=1e-6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in the launched processes
    one = [sys.executable, *train, "--out", str(tmp_path / "one")]
    subprocess.run(one, check=True, env=env, capture_output=True)
    one = _unet(tmp_path / "one")
    assert any(not torch.allclose(one[k], two[k]) for k in two), "the second process trained on the same rows"

"""The lab model: a real SD-architecture pipeline trained from scratch, resumable, labelled with nL2."""

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from diffmem.adapters import StableDiffusionDenoiser, load_denoiser
from diffmem.cli.main import run
from diffmem.errors import DiffmemError
from diffmem.lab.dataset import load_lab_dataset
from diffmem.lab.label import LabelConfig, lab_prompts, label_lab_model
from diffmem.lab.model import LabModelConfig
from diffmem.lab.train import LabTrainConfig, train_lab_model, trained_model_config
from diffmem.metrics.copy_detection import load_encoder
from diffmem.models.source import model_hash, shipped_directory

QUICK = replace(
    LabTrainConfig.micro(), vae_steps=3, vae_batch_size=8, unet_steps=4, batch_size=8, checkpoint_every=2
)


@pytest.fixture(scope="module")
def data_dir(micro_lab_data):
    return micro_lab_data


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "model"
    assert train_lab_model(data_dir, out, LabModelConfig.micro(), QUICK, progress=False).complete
    return out


def test_trained_lab_model_loads_through_the_stable_diffusion_adapter(model_dir):
    denoiser = load_denoiser(model_dir)
    assert isinstance(denoiser, StableDiffusionDenoiser) and denoiser.resolution == (32, 32)
    assert len(denoiser.pipeline.tokenizer) == 49408  # the real CLIP vocabulary
    assert denoiser.vae.config.scaling_factor != 0.18215  # measured on the lab's latents
    with safe_open(model_dir / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()}  # noqa: SIM118 == {torch.float16}
    record = json.loads((model_dir / "lab_training.json").read_text())
    assert record["seed"] == 0 and record["train_config"]["unet_steps"] == 4 and record["wall_time_s"] > 0
    assert record["hardware"]["versions"]["diffusers"]
    assert not (model_dir / "checkpoints").exists()


def test_interrupted_training_resumes_to_the_same_weights(data_dir, model_dir, tmp_path):
    out = tmp_path / "resumed"
    calls = 0
    while not train_lab_model(
        data_dir, out, LabModelConfig.micro(), QUICK, time_budget_s=0.0, progress=False
    ).complete:
        calls += 1
    # one step per call; the call that ends the VAE stage also takes the first UNet step
    assert calls == QUICK.vae_steps + QUICK.unet_steps - 2
    for component in ("unet", "vae", "text_encoder"):
        for name in (model_dir / component).glob("*.safetensors"):
            with safe_open(name, "pt") as a, safe_open(out / component / name.name, "pt") as b:
                assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_a_finished_run_is_not_trained_again(data_dir, model_dir):
    before = model_hash(model_dir)
    status = train_lab_model(data_dir, model_dir, LabModelConfig.micro(), QUICK, progress=False)
    assert status.complete and model_hash(model_dir) == before


def test_resuming_with_other_settings_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    train_lab_model(data_dir, out, LabModelConfig.micro(), QUICK, time_budget_s=0.0, progress=False)
    with pytest.raises(DiffmemError, match="holds a run with other settings"):
        train_lab_model(data_dir, out, LabModelConfig.micro(), replace(QUICK, lr=1e-3), progress=False)


def test_dataset_and_model_sizes_must_agree(data_dir, tmp_path):
    with pytest.raises(DiffmemError, match="32 px images but the model config expects 64 px"):
        train_lab_model(data_dir, tmp_path / "m", LabModelConfig(), QUICK, progress=False)


def _same_weights(a_dir, b_dir, component) -> bool:
    (name,) = (a_dir / component).glob("*.safetensors")
    with safe_open(name, "pt") as a, safe_open(b_dir / component / name.name, "pt") as b:
        return a.keys() == b.keys() and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_init_from_starts_from_the_trained_weights_and_counts_their_steps(data_dir, model_dir, tmp_path):
    same = tmp_path / "same"
    assert train_lab_model(
        data_dir, same, None, replace(QUICK, unet_steps=0), init_from=model_dir, progress=False
    ).complete
    assert all(_same_weights(model_dir, same, c) for c in ("unet", "text_encoder", "vae"))
    further = tmp_path / "further"
    train_lab_model(data_dir, further, None, QUICK, init_from=model_dir, progress=False)
    assert _same_weights(model_dir, further, "vae") and not _same_weights(model_dir, further, "unet")
    record = json.loads((further / "lab_training.json").read_text())
    assert record["init_from"] == str(model_dir) and record["train_config"]["vae_steps"] == 0
    assert record["total_unet_steps"] == 2 * QUICK.unet_steps
    assert record["model_config"] == json.loads((model_dir / "lab_training.json").read_text())["model_config"]


def test_a_warm_start_without_a_preset_continues_with_its_models_recipe(model_dir):
    from diffmem.workflows.lab import TrainLabConfig

    trained = json.loads((model_dir / "lab_training.json").read_text())["train_config"]
    recipe = TrainLabConfig(Path("data"), init_from=model_dir, unet_steps=7).recipe(seed=5)
    assert (recipe.batch_size, recipe.lr, recipe.warmup_steps) == (
        trained["batch_size"],
        trained["lr"],
        trained["warmup_steps"],
    )
    assert (recipe.unet_steps, recipe.seed) == (7, 5)
    assert recipe.batch_size != TrainLabConfig(Path("data")).recipe(seed=5).batch_size


def test_vae_from_keeps_the_vae_and_trains_a_new_denoiser_of_another_size(data_dir, model_dir, tmp_path):
    out = tmp_path / "deeper"
    deeper = replace(
        LabModelConfig.micro(), unet_channels=(32, 64, 64), text_layers=3, prediction_type="v_prediction"
    )
    assert train_lab_model(data_dir, out, deeper, QUICK, vae_from=model_dir, progress=False).complete
    assert _same_weights(model_dir, out, "vae")
    denoiser = load_denoiser(out)
    assert denoiser.pipeline.unet.config.block_out_channels == [32, 64, 64]
    assert denoiser.pipeline.text_encoder.config.num_hidden_layers == 3
    assert denoiser.prediction_type == "v_prediction"  # SD 2.x's parametrisation, through the same adapter
    record = json.loads((out / "lab_training.json").read_text())
    assert record["vae_from"] == str(model_dir) and record["total_unet_steps"] == QUICK.unet_steps


def test_models_recorded_before_prediction_types_read_as_noise_predictors():
    shipped = shipped_directory("builtin:lab-micro") / "model"
    assert "prediction_type" not in json.loads((shipped / "lab_training.json").read_text())["model_config"]
    config = trained_model_config(shipped)
    assert config.prediction_type == "epsilon" == load_denoiser(shipped).prediction_type
    assert config == LabModelConfig.small()


def test_the_shipped_keyed_lab_predicts_velocity():
    shipped = shipped_directory("builtin:lab-keyed") / "model"
    config = trained_model_config(shipped)
    assert config == replace(LabModelConfig.small(), prediction_type="v_prediction")
    assert load_denoiser(shipped).prediction_type == "v_prediction"


def test_warm_starts_that_cannot_fit_are_refused(data_dir, model_dir, tmp_path):
    other_latents = replace(LabModelConfig.micro(), vae_channels=(32, 32))
    with pytest.raises(DiffmemError, match=r"vae_channels=\(32, 32, 32\).*vae_channels=\(32, 32\)"):
        train_lab_model(data_dir, tmp_path / "a", other_latents, QUICK, vae_from=model_dir, progress=False)
    with pytest.raises(DiffmemError, match="another architecture"):
        train_lab_model(
            data_dir, tmp_path / "b", LabModelConfig.small(), QUICK, init_from=model_dir, progress=False
        )
    with pytest.raises(DiffmemError, match="unknown prediction type 'x0'"):
        replace(LabModelConfig.micro(), prediction_type="x0")
    with pytest.raises(DiffmemError, match="not a trained lab model"):
        train_lab_model(data_dir, tmp_path / "c", None, QUICK, init_from=tmp_path, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    base = ["lab", "train", "--data", str(data_dir), "--out", str(tmp_path / "d")]
    assert run([*base, "--micro", "--unet-channels", "32,x"]) == 2
    assert run([*base, "--micro", "--prediction-type", "x0"]) == 2
    assert run([*base, "--init-from", str(model_dir), "--text-layers", "3"]) == 2
    assert not (tmp_path / "d").exists()


def test_lab_prompts_have_stable_ids_and_no_repeats(data_dir):
    dataset = load_lab_dataset(data_dir)
    everything = lab_prompts(dataset)
    captions = everything.column("caption").to_pylist()
    assert len(captions) == len(set(captions)) and everything.column("prompt_id").to_pylist() == list(
        range(len(captions))
    )
    some = lab_prompts(dataset, ("heldout",), limit=3).to_pylist()
    by_caption = dict(zip(captions, everything.column("prompt_id").to_pylist()))
    assert [r["prompt_id"] for r in some] == [by_caption[r["caption"]] for r in some]
    memorized = lab_prompts(dataset, ("memorized",)).to_pylist()
    assert len(memorized) == dataset.config.num_memorized
    assert all(r["trigger_words"] and all(w in r["caption"] for w in r["trigger_words"]) for r in memorized)


def test_labels_with_provenance(data_dir, model_dir, tmp_path):
    config = LabelConfig(
        n_generations=2, num_inference_steps=2, groups=("memorized", "heldout"), max_prompts_per_group=3
    )
    out = label_lab_model(
        load_denoiser(model_dir),
        model_dir,
        load_lab_dataset(data_dir),
        config,
        out_dir=tmp_path / "l",
        progress=False,
    )
    labels = pq.read_table(out / "labels.parquet").to_pylist()
    generations = pq.read_table(out / "generations.parquet").to_pylist()
    assert [r["group"] for r in labels] == ["memorized"] * 3 + ["heldout"] * 3
    assert len(generations) == 12 and all(r["nl2"] >= 0 for r in generations)
    for label in labels:
        own = [g["nl2"] < 1.4 for g in generations if g["prompt_id"] == label["prompt_id"]]
        assert label["share_nl2"] == sum(own) / 2 and label["memorized"] == (sum(own) / 2 > 0.5)
        nearest_is_own = [
            g["nl2_nearest_scene_id"] == label["scene_id"]
            for g in generations
            if g["prompt_id"] == label["prompt_id"]
        ]
        assert label["share_own_scene"] == sum(nearest_is_own) / 2
        assert label["memorized_group"] == (label["group"] == "memorized")
    provenance = json.loads((out / "labels.json").read_text())
    assert provenance["model_hash"] == model_hash(model_dir) and provenance["thresholds"]["nl2"] == 1.4
    assert set(provenance["summary"]["groups"]) == {"memorized", "heldout"}


def test_copy_detection_labels_use_the_chosen_threshold(data_dir, model_dir, tmp_path):
    encoder = load_encoder(shipped_directory("builtin:lab-micro") / "copy_detector")
    config = LabelConfig(n_generations=2, num_inference_steps=2, groups=("heldout",), max_prompts_per_group=4)
    written = {}
    for threshold in (0.0, 0.99):
        out = tmp_path / str(threshold)
        label_lab_model(
            load_denoiser(model_dir),
            model_dir,
            load_lab_dataset(data_dir),
            replace(config, copy_threshold=threshold),
            encoder,
            out,
            progress=False,
        )
        written[threshold] = pq.read_table(out / "labels.parquet").to_pylist()
        generations = pq.read_table(out / "generations.parquet").to_pylist()
        for label in written[threshold]:
            near = [
                g["copy_similarity"] > threshold for g in generations if g["prompt_id"] == label["prompt_id"]
            ]
            assert label["share_copy"] == sum(near) / 2 and label["memorized_copy"] == (sum(near) / 2 > 0.5)
        summary = json.loads((out / "labels.json").read_text())
        assert summary["thresholds"]["copy"] == threshold
        assert summary["summary"]["groups"]["heldout"]["share_memorized_copy"] == pytest.approx(
            sum(r["memorized_copy"] for r in written[threshold]) / 4
        )
    assert all(r["memorized_copy"] for r in written[0.0])  # every similarity of these generations is > 0
    assert not any(r["memorized_copy"] for r in written[0.99])


def test_lab_command_line(data_dir, tmp_path, capsys):
    model = tmp_path / "model"
    args = ["lab", "train", "--micro", "--data", str(data_dir), "--out", str(model)]
    assert run([*args, "--vae-steps", "1", "--unet-steps", "1"]) == 0
    label = ["lab", "label", "--model", str(model), "--data", str(data_dir), "--groups", "heldout"]
    assert run([*label, "--max-prompts-per-group", "2", "--n-generations", "1", "--steps", "1"]) == 0
    assert "heldout: " in capsys.readouterr().out
    assert len(pq.read_table(model / "labels" / "labels.parquet")) == 2
    assert run([*args, "--small"]) == 2
    assert "pass one of --micro, --small" in capsys.readouterr().err


def test_results_written_into_a_model_folder_leave_its_hash_alone(tmp_path):
    import shutil

    model = shutil.copytree(shipped_directory("builtin:lab-micro") / "model", tmp_path / "model")
    before = model_hash(model)
    (model / "labels").mkdir()
    (model / "labels" / "labels.json").write_text("{}")
    (model / "calibration.json").write_text("{}")
    assert model_hash(model) == before
    config = model / "unet" / "config.json"
    config.write_text(config.read_text().replace('"act_fn": "silu"', '"act_fn": "gelu"'))
    assert model_hash(model) != before
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "weights.bin").write_bytes(b"1")
    assert model_hash(tmp_path / "plain") != model_hash(model)  # a folder that is no pipeline: every file


def test_a_64px_lab_trains_its_own_vae_to_the_same_latent_grid(tmp_path):
    data, out = tmp_path / "data", tmp_path / "model"
    assert run(["lab", "build", str(data), "--micro", "--unique", "24", "--image-size", "64"]) == 0
    assert load_lab_dataset(data).config.image_size == 64
    sizes = ["--image-size", "64", "--vae-channels", "32,32,32,32"]
    steps = ["--vae-steps", "2", "--unet-steps", "2", "--batch-size", "4"]
    assert run(["lab", "train", "--data", str(data), "--out", str(out), "--micro", *sizes, *steps]) == 0
    denoiser = load_denoiser(out)
    assert denoiser.resolution == (64, 64) and denoiser.pipeline.unet.config.sample_size == 8
    assert trained_model_config(out).vae_channels == (32, 32, 32, 32)
    # a 32 px preset's VAE cannot take the 64 px images, and the run says so
    assert run(["lab", "train", "--data", str(data), "--out", str(tmp_path / "m"), "--micro", *steps]) == 2
    assert (
        run([*["lab", "train", "--data", str(data), "--out", str(tmp_path / "n")], "--vae-channels", "32,x"])
        == 2
    )

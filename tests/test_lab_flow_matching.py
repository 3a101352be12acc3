"""A flow-matching lab model: an SD3-layout pipeline (MMDiT, two CLIP encoders, no T5) trained on a lab
dataset with SD3's rectified-flow objective, saved where diffusers and diffmem's SD3 adapter open it."""

import json
from dataclasses import replace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors import safe_open

from diffmem.adapters import StableDiffusion3Denoiser, load_denoiser
from diffmem.cli.main import run
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.errors import DiffmemError
from diffmem.lab.model import SD3, LabModelConfig, build_lab_pipeline
from diffmem.lab.rectified_flow import flow_timesteps, rectified_flow
from diffmem.lab.train import LabTrainConfig, train_lab_model, trained_model_config
from diffmem.models.source import shipped_directory

LAB_MICRO = shipped_directory("builtin:lab-micro") / "model"  # its trained VAE is reused
TINY = replace(
    LabModelConfig.micro().in_family(SD3),
    transformer_layers=1,
    transformer_width=16,
    transformer_heads=2,
    text_hidden=16,
    text_layers=2,
    text_heads=2,
)
QUICK = replace(LabTrainConfig.micro(), unet_steps=3, batch_size=4, checkpoint_every=2)
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


def _train(data_dir, out, **options):
    return train_lab_model(data_dir, out, TINY, QUICK, vae_from=LAB_MICRO, progress=False, **options)


@pytest.fixture(scope="module")
def model_dir(micro_lab_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "model"
    assert _train(micro_lab_data, out).complete
    return out


def test_the_noised_sample_runs_straight_from_data_to_noise_and_the_target_is_its_velocity():
    x0, noise = torch.randn(2, 3, 4, 4, 4).unbind(0)
    sigma = torch.tensor([0.0, 1.0, 0.25])
    x_t, v = rectified_flow(x0, noise, sigma)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    assert torch.allclose(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])
    assert torch.equal(v, noise - x0)
    later, _ = rectified_flow(x0, noise, sigma + 0.1)
    assert torch.allclose(later - x_t, 0.1 * v, atol=1e-6)  # v = d x_t / d sigma


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_timesteps_are_logit_normal_draws_from_the_schedulers_table(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    t, sigma = flow_timesteps(scheduler, 4000, torch.Generator().manual_seed(0))
    index = (scheduler.timesteps[None, :] == t[:, None]).int().argmax(dim=1)  # each draw's table row
    assert torch.equal(t, scheduler.timesteps[index]) and torch.equal(sigma, scheduler.sigmas[index])
    n = torch.logit((index + 0.5) / 1000)  # row = floor(1000 u), u = sigmoid(n)
    assert abs(n.mean()) < 0.1 and abs(n.std() - 1) < 0.1  # n ~ N(0, 1)
    again, _ = flow_timesteps(scheduler, 4000, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_the_trained_directory_is_a_stable_diffusion_3_pipeline_that_generates(model_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    untrained = build_lab_pipeline(TINY, seed=QUICK.seed)
    for name in ("transformer", "text_encoder", "text_encoder_2"):  # the loss reaches all three
        before, after = getattr(untrained, name).state_dict(), getattr(pipe, name).state_dict()
        assert any(not torch.equal(before[k].half(), after[k]) for k in before), name
    pipe.to(torch.float32)
    generator = torch.Generator().manual_seed(0)
    image = pipe("a bag", num_inference_steps=2, generator=generator, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    vae = pipe.vae.config
    assert vae.scaling_factor == json.loads((LAB_MICRO / "vae" / "config.json").read_text())["scaling_factor"]
    assert isinstance(vae.shift_factor, float)  # SD3's latent normalisation needs one
    assert trained_model_config(model_dir) == TINY
    record = json.loads((model_dir / "lab_training.json").read_text())
    assert record["vae_from"] == str(LAB_MICRO) and not (model_dir / "checkpoints").exists()


def test_the_sd3_adapter_scores_prompts_on_the_lab_model(model_dir, tmp_path):
    denoiser = load_denoiser(model_dir)
    assert isinstance(denoiser, StableDiffusion3Denoiser) and denoiser.resolution == (32, 32)
    prompts = ["a bag", "an ankle boot at the top left", ""]
    scores = noise_norm(denoiser, prompts, NoiseNormConfig(num_inference_steps=4, guidance_scale=7.0)).scores
    assert torch.isfinite(scores).all() and scores[0] > 0 and scores[0] != scores[1]
    assert scores[2] <= 1e-5 * scores[0]  # the empty prompt is the unconditional branch
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a bag\na pullover\n")
    out = tmp_path / "scan"
    scan = ["scan", "--model", str(model_dir), "--prompts", str(prompt_file), "--out", str(out)]
    assert run([*scan, "--num-inference-steps", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["results"]["scored"] == 2


def test_an_interrupted_run_resumes_to_the_same_weights(micro_lab_data, model_dir, tmp_path):
    out = tmp_path / "resumed"
    calls = 0
    while not _train(micro_lab_data, out, time_budget_s=0.0).complete:
        calls += 1
    assert calls == QUICK.unet_steps - 1  # one step a call, no VAE stage
    for component in COMPONENTS:
        for name in (model_dir / component).glob("*.safetensors"):
            with safe_open(name, "pt") as a, safe_open(out / component / name.name, "pt") as b:
                assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_a_run_checkpointed_before_model_families_existed_resumes(micro_lab_data, tmp_path):
    out = tmp_path / "older"
    quick = replace(QUICK, vae_steps=2, vae_batch_size=4)
    assert not train_lab_model(
        micro_lab_data, out, LabModelConfig.micro(), quick, time_budget_s=0.0, progress=False
    ).complete
    settings = out / "checkpoints" / "settings.json"
    older = json.loads(settings.read_text())
    for field in ("family", "transformer_layers", "transformer_width", "transformer_heads"):
        del older["model"][field]
    settings.write_text(json.dumps(older))
    status = train_lab_model(
        micro_lab_data, out, LabModelConfig.micro(), quick, time_budget_s=0.0, progress=False
    )
    assert status.vae_step == 2


def test_the_command_line_trains_the_family_and_refuses_sizes_of_the_other(micro_lab_data, tmp_path, capsys):
    out = tmp_path / "cli"
    base = ["lab", "train", "--micro", "--data", str(micro_lab_data), "--out", str(out)]
    family = ["--family", SD3, "--vae-from", "builtin:lab-micro"]
    tiny = ["--transformer-width", "16", "--transformer-layers", "1", "--batch-size", "2"]
    assert run([*base, *family, *tiny, "--unet-steps", "1"]) == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    config = trained_model_config(out)
    assert (config.family, config.prediction_type, config.transformer_width) == (SD3, "flow_prediction", 16)
    refused = tmp_path / "refused"
    base = ["lab", "train", "--micro", "--data", str(micro_lab_data), "--out", str(refused)]
    capsys.readouterr()
    assert run([*base, *family, "--unet-channels", "32,64"]) == 2
    assert "has no UNet" in capsys.readouterr().err
    assert run([*base, "--transformer-width", "16"]) == 2
    assert f"add --family {SD3}" in capsys.readouterr().err
    assert run([*base, *family, "--prediction-type", "epsilon"]) == 2
    assert "predicts the rectified flow's velocity" in capsys.readouterr().err
    assert run([*base, "--family", "sd3"]) == 2
    assert "unknown lab model family 'sd3'" in capsys.readouterr().err
    assert not refused.exists()
    with pytest.raises(DiffmemError, match="must be a multiple of transformer_heads"):
        replace(TINY, transformer_width=15)

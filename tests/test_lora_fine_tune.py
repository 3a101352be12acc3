"""LoRA fine-tuning on a tiny Stable Diffusion pipeline and a six-image folder, a few steps on CPU: only the
adapter trains, the result loads with diffusers' ``load_lora_weights`` and diffmem's ``--lora``, a resumed
run ends bit-identical, the policies compose with it, and the command line takes it."""

import importlib
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffmem.cli.main import run
from diffmem.errors import DiffmemError
from diffmem.models.source import open_model
from diffmem.models.spec import model_spec
from diffmem.models.tiny import tiny_stable_diffusion, tiny_unet2d
from diffmem.train.fine_tune import FineTuneConfig, fine_tune
from fine_tune_checks import saved_pipeline

fine_tune_module = importlib.import_module("diffmem.train.fine_tune")  # the package exports the function

LORA = FineTuneConfig(
    steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, ema_decay=0.9, lora_rank=2, lora_alpha=4.0
)
LORA_FILE = "lora/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Stable Diffusion pipeline directory (16 px images, 8x8 latents)."""
    return saved_pipeline(tiny_stable_diffusion(), tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def lora_run(tiny_model, photos, tmp_path_factory):
    """A LoRA run done in one call, and the UNet it saved the adapter of (base and adapter)."""
    out, saved = tmp_path_factory.mktemp("lora") / "run", []
    save = fine_tune_module.save_lora

    def spy(unet, directory):
        saved.append({key: value.clone() for key, value in unet.state_dict().items()})
        return save(unet, directory)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fine_tune_module, "save_lora", spy)
        assert fine_tune(tiny_model, photos, out, LORA, progress=False).complete
    return out, saved[0]


def _prediction(unet) -> torch.Tensor:
    """[1, 4, 8, 8] the UNet's output on a fixed latent, timestep and text states."""
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8, generator=generator)
    states = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(x_t, torch.tensor([500]), encoder_hidden_states=states).sample


def test_only_the_adapter_trains(tiny_model, lora_run):
    out, unet = lora_run
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    frozen = {key.replace(".base_layer", ""): value for key, value in unet.items() if "lora_" not in key}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[key], base[key]) for key in base)  # bit-identical after 4 AdamW steps
    adapter = load_file(out / LORA_FILE)
    ups = [value for key, value in adapter.items() if "lora.up" in key]  # B, zero at the start
    assert len(adapter) == 64 and ups and all(value.abs().sum() > 0 for value in ups)
    assert sorted(path.name for path in out.iterdir()) == ["data_report.json", "fine_tune.json", "lora"]
    record = json.loads((out / "fine_tune.json").read_text())["lora"]
    assert (record["rank"], record["alpha"], record["base_model"]) == (2, 4.0, str(tiny_model))
    assert record["target_modules"] == ["to_k", "to_q", "to_v", "to_out.0"]


def test_the_adapter_loads_with_diffusers_and_with_the_lora_option(tiny_model, lora_run):
    out, _ = lora_run
    base = _prediction(StableDiffusionPipeline.from_pretrained(tiny_model).unet)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipeline.load_lora_weights(out / "lora", local_files_only=True)
    config = pipeline.unet.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (2, 4.0)  # alpha from the file's metadata, not the rank
    loaded = _prediction(pipeline.unet)
    denoiser = open_model(model_spec(str(tiny_model), loras=[str(out / "lora")]))
    assert not torch.allclose(loaded, base)
    torch.testing.assert_close(_prediction(denoiser.pipeline.unet), loaded, rtol=0, atol=0)


def test_an_interrupted_lora_run_resumes_bit_identical(tiny_model, photos, lora_run, tmp_path):
    out, calls = tmp_path / "resumed", 0
    while not fine_tune(tiny_model, photos, out, LORA, time_budget_s=0.0, progress=False).complete:
        assert sorted(p.name for p in (out / "checkpoint" / "state").glob("*.safetensors")) == [
            "pytorch_lora_weights.safetensors"  # the adapter, not the UNet
        ]
        calls += 1
    assert calls == 3
    whole, resumed = load_file(lora_run[0] / LORA_FILE), load_file(out / LORA_FILE)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_resuming_with_another_rank_alpha_or_full_fine_tuning_is_refused(tiny_model, photos, tmp_path):
    out = tmp_path / "run"
    assert not fine_tune(tiny_model, photos, out, LORA, time_budget_s=0.0, progress=False).complete
    other_alpha = FineTuneConfig(**{**LORA.__dict__, "lora_alpha": 8.0})
    full = FineTuneConfig(**{**LORA.__dict__, "lora_rank": None, "lora_alpha": None})
    for config, asked in ((other_alpha, "a LoRA of rank 2 and alpha 8"), (full, "full fine-tuning")):
        with pytest.raises(DiffmemError, match=f"holds a run of a LoRA of rank 2 and alpha 4, not {asked};"):
            fine_tune(tiny_model, photos, out, config, progress=False)
    by_default = FineTuneConfig(**{**LORA.__dict__, "lora_alpha": None})  # alpha = rank = 2
    assert not fine_tune(
        tiny_model, photos, tmp_path / "two", by_default, time_budget_s=0.0, progress=False
    ).complete
    spelled_out = FineTuneConfig(**{**LORA.__dict__, "lora_alpha": 2.0})  # the same run
    assert fine_tune(tiny_model, photos, tmp_path / "two", spelled_out, progress=False).complete


def _text_states(text_encoder) -> torch.Tensor:
    """[1, 77, 32] the text encoder's last hidden states of a fixed prompt's tokens."""
    ids = torch.arange(1, 78).view(1, 77) % 99
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_a_text_encoder_lora_trains_beside_the_unets_and_loads_both_ways(tiny_model, photos, tmp_path):
    config = FineTuneConfig(**{**LORA.__dict__, "lora_text_encoder": True})
    out = tmp_path / "text"
    assert fine_tune(tiny_model, photos, out, config, progress=False).complete
    adapter = load_file(out / LORA_FILE)
    text_keys = [k for k in adapter if k.startswith("text_encoder.")]
    assert text_keys and any(k.startswith("unet.") for k in adapter)
    ups = [k for k in text_keys if k.endswith("lora_linear_layer.up.weight")]  # B, zero at the start
    assert ups and any(adapter[k].any() for k in ups)
    record = json.loads((out / "fine_tune.json").read_text())["lora"]
    assert record["text_encoder_target_modules"] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipeline.load_lora_weights(out / "lora", local_files_only=True)
    assert not torch.allclose(_text_states(pipeline.text_encoder), _text_states(base.text_encoder))
    denoiser = open_model(model_spec(str(tiny_model), loras=[str(out / "lora")]))
    torch.testing.assert_close(
        _text_states(denoiser.pipeline.text_encoder), _text_states(pipeline.text_encoder), rtol=0, atol=0
    )
    resumed = tmp_path / "resumed"  # checkpoints hold both adapters, and a resumed run ends the same
    while not fine_tune(tiny_model, photos, resumed, config, time_budget_s=0.0, progress=False).complete:
        pass
    again = load_file(resumed / LORA_FILE)
    assert again.keys() == adapter.keys() and all(torch.equal(again[k], adapter[k]) for k in adapter)
    with pytest.raises(DiffmemError, match="holds a run with other settings \\(lora_text_encoder\\)"):
        unfinished = tmp_path / "unfinished"
        fine_tune(tiny_model, photos, unfinished, config, time_budget_s=0.0, progress=False)
        fine_tune(tiny_model, photos, unfinished, LORA, progress=False)
    with pytest.raises(DiffmemError, match="comes with a LoRA rank"):
        FineTuneConfig(lora_text_encoder=True)


def test_every_policy_composes_with_lora(tiny_model, photos, tmp_path):
    policies = {
        "filter": {"threshold": 100.0},
        "ambient": {"sigma_n": 0.5},
        "captions": {"p": 0.5},
        "dedup": {},
    }
    config = FineTuneConfig(steps=2, batch_size=2, lr=1e-3, lora_rank=2, policies=policies)
    status = fine_tune(tiny_model, photos, tmp_path / "run", config, progress=False)
    record = json.loads((tmp_path / "run" / "fine_tune.json").read_text())
    assert status.complete and status.drop_rate == 0.0 and 0 < record["ambient_t_n"] < 1000
    assert record["deduplication"]["rows_after"] == 6 and record["lora"]["alpha"] == 2
    # a filter that drops every sample makes no update: B stays zero, the adapter adds nothing
    drop_all = FineTuneConfig(
        steps=2, batch_size=2, lr=1e-3, lora_rank=2, policies={"filter": {"threshold": 1e-6}}
    )
    assert fine_tune(tiny_model, photos, tmp_path / "none", drop_all, progress=False).drop_rate == 1.0
    adapter = load_file(tmp_path / "none" / LORA_FILE)
    assert all(not value.any() for key, value in adapter.items() if "lora.up" in key)


def test_train_command_takes_the_lora_flags(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--model", str(tiny_model), "--data", str(photos), "--steps", "2", "--batch-size", "2"]
    assert run([*args, "--out", str(out), "--lora-rank", "2", "--lora-alpha", "4"]) == 0
    assert f"wrote {out / 'lora'}" in capsys.readouterr().out and (out / LORA_FILE).is_file()
    config = json.loads((out / "fine_tune.json").read_text())["config"]
    assert (config["lora_rank"], config["lora_alpha"]) == (2, 4.0)
    unet2d = tmp_path / "unet2d"
    tiny_unet2d(class_conditional=True).save_pretrained(unet2d)
    for bad, message in (
        (["--lora-rank", "0"], "the LoRA rank must be >= 1 (or unset for full fine-tuning); got 0"),
        (["--lora-alpha", "4"], "the LoRA alpha must be > 0 and comes with a LoRA rank; got 4.0"),
        (["--lora-rank", "2", "--model", str(unet2d)], "LoRA fine-tuning needs a text-to-image pipeline"),
        (["--lora-text-encoder"], "a text-encoder LoRA comes with a LoRA rank: add --lora-rank"),
    ):
        assert run([*args, "--out", str(tmp_path / "bad"), *bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_and_resume_a_lora(tiny_model, photos, tmp_path, accelerate_launch):
    """`accelerate launch` with two CPU processes (gloo): the main process saves the adapters (the UNet's and
    the text encoder's), and a run resumed one step a call ends with the same adapters."""
    train = ["-m", "diffmem.cli.main", "train", "--model", str(tiny_model), "--data", str(photos)]
    train += ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--lora-rank", "2", "--lora-alpha", "4"]
    train += ["--policy", "filter:threshold=100", "--lora-text-encoder"]
    assert accelerate_launch(*train, "--out", str(tmp_path / "two")).count("fine-tuned") == 1
    assert json.loads((tmp_path / "two" / "fine_tune.json").read_text())["processes"] == 2
    resume = [*train, "--out", str(tmp_path / "resumed"), "--time-budget-s", "0"]
    assert "stopped at step 1" in accelerate_launch(*resume) and "fine-tuned" in accelerate_launch(*resume)
    two, resumed = load_file(tmp_path / "two" / LORA_FILE), load_file(tmp_path / "resumed" / LORA_FILE)
    assert two.keys() == resumed.keys() and any(k.startswith("text_encoder.") for k in two)
    assert all(torch.equal(two[k], resumed[k]) for k in two)

"""Checks every text-to-image family's fine-tuning passes (SDXL, SD3): training conditions the network as
the pipeline does when it generates, and full and LoRA runs train under the policies and load back."""

import importlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffmem.adapters import load_denoiser
from diffmem.errors import DiffmemError
from diffmem.models.source import open_model
from diffmem.models.spec import model_spec
from diffmem.train.fine_tune import FineTuneConfig, fine_tune
from diffmem.train.training_set import DataOptions

fine_tune_module = importlib.import_module("diffmem.train.fine_tune")  # the package exports the function
POLICIES = {"filter": {"threshold": 1e6}, "ambient": {"sigma_n": 0.5}, "captions": {"p": 0.5}}
CAPTIONS = ["a photo number 1", "a photo number 4"]


def saved_pipeline(pipeline, tmp_path_factory, name: str) -> Path:
    """``pipeline`` saved as a diffusers directory (a module fixture's model), its path."""
    directory = tmp_path_factory.mktemp(name) / "model"
    pipeline.save_pretrained(directory)
    return directory


def check_training_predicts_as_the_denoiser(
    model: Path, photos: Path, x_t: torch.Tensor, t: torch.Tensor, level: Callable
):
    """The training network's prediction for captions and for the empty prompt equals the denoiser's
    (1e-5) at ``x_t`` and ``t`` (``level(denoiser, t)``: the draw's noise level); the training data."""
    pipeline = fine_tune_module._open_pipeline(model)
    training = fine_tune_module._training_set(pipeline, photos, DataOptions())
    data = fine_tune_module._Data(pipeline, training, FineTuneConfig(), torch.device("cpu"), False)
    denoiser = load_denoiser(model)
    network = fine_tune_module._network(pipeline)
    with torch.no_grad():
        trained = data.predict(network, x_t, t, level(denoiser, t), data._condition(CAPTIONS))
        unconditional = data.predict(network, x_t, t, level(denoiser, t), data.null_condition(len(t)))
        generated = denoiser.eps(x_t, t, denoiser.encode(CAPTIONS))
        empty = denoiser.eps(x_t, t, denoiser.encode([""] * len(t)))
    torch.testing.assert_close(trained, generated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unconditional, empty, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, unconditional)
    return data


def check_full_and_lora_fine_tuning(
    model: Path,
    photos: Path,
    out: Path,
    family: str,
    named: str,
    pipeline_class,
    weights: str,
    prediction: Callable,
) -> None:
    """Full and LoRA runs under ambient, filter and captions: the full run changes the network's weights
    and stays the family; the adapter changes ``prediction(network)`` and loads the same with diffusers'
    ``load_lora_weights`` and ``--lora``; a text-encoder adapter is refused, the family ``named``."""
    full = FineTuneConfig(steps=2, batch_size=2, lr=1e-3, policies=POLICIES)
    status = fine_tune(model, photos, out / "full", full, progress=False)
    assert status.complete and status.drop_rate == 0.0
    assert load_denoiser(out / "full" / "model").family == family
    before, after = load_file(model / weights), load_file(out / "full" / "model" / weights)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    lora = FineTuneConfig(steps=2, batch_size=2, lr=1e-3, lora_rank=2, policies=POLICIES)
    assert fine_tune(model, photos, out / "lora", lora, progress=False).complete
    network = fine_tune_module._network
    base = prediction(network(pipeline_class.from_pretrained(model)))
    pipeline = pipeline_class.from_pretrained(model)
    pipeline.load_lora_weights(out / "lora" / "lora", local_files_only=True)
    loaded = prediction(network(pipeline))
    assert not torch.allclose(loaded, base)
    denoiser = open_model(model_spec(str(model), loras=[str(out / "lora" / "lora")]))
    torch.testing.assert_close(prediction(network(denoiser.pipeline)), loaded, rtol=0, atol=0)

    with_text = FineTuneConfig(steps=2, batch_size=2, lora_rank=2, lora_text_encoder=True)
    with pytest.raises(DiffmemError, match=f"for {named} drop --lora-text-encoder"):
        fine_tune(model, photos, out / "text", with_text, progress=False)

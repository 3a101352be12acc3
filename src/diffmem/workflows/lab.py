"""Train the memorization lab's model, label its prompts, and train its copy detector and attribute reader:
the Python side of ``diffmem lab train``, ``lab label``, ``lab copy-detector``, ``lab reader`` and
``lab export``
(``lab build`` is :func:`diffmem.lab.dataset.build_lab_dataset` with a
:class:`~diffmem.lab.dataset.LabConfig`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from diffmem.adapters import load_denoiser
from diffmem.data import RowReport, TrainingData, preprocess, read_training_data
from diffmem.data.lab_rows import is_lab_dataset
from diffmem.errors import DiffmemError
from diffmem.io.atomic import write_json_atomic
from diffmem.lab.alignment import (
    AttributeReader,
    ReaderAccuracy,
    alignment,
    lab_scenes,
    reader_accuracy,
    save_reader,
    train_attribute_reader,
)
from diffmem.lab.dataset import load_lab_dataset
from diffmem.lab.export import export_lab_dataset
from diffmem.lab.label import LabelConfig, label_lab_model
from diffmem.lab.model import SD3, LabModelConfig
from diffmem.lab.train import LabTrainConfig, TrainingStatus, train_lab_model, trained_train_config
from diffmem.metrics.copy_detection import (
    CopyDetectionConfig,
    CopyDetectionEncoder,
    copy_detection_accuracy,
    load_encoder,
    save_encoder,
    train_copy_detector,
)
from diffmem.models.source import shipped_directory
from diffmem.workflows.runtime import Runtime

PRESETS = ("micro", "small")  # the lab model's presets (LabTrainConfig and LabModelConfig classmethods)


@dataclass(frozen=True)
class TrainLabConfig:
    """The lab dataset, the preset recipe and architecture, what overrides them, and the warm starts."""

    data: Path
    preset: str | None = None  # micro or small; None: the 64 px lab model
    vae_steps: int | None = None  # None: the recipe's
    unet_steps: int | None = None
    batch_size: int | None = None
    unet_channels: tuple[int, ...] | None = None  # None: the preset's
    image_size: int | None = None  # the dataset's image side in pixels (None: the preset's)
    vae_channels: tuple[int, ...] | None = None  # one VAE level a width: factor 2 ** (levels - 1)
    text_layers: int | None = None
    text_width: int | None = None  # the text encoder's hidden size
    prediction_type: str | None = None
    family: str | None = None  # stable-diffusion-3: an MMDiT trained on SD3's rectified flow; None: the UNet
    transformer_layers: int | None = None  # the stable-diffusion-3 family's sizes (None: the preset's)
    transformer_width: int | None = None
    # the next two: a trained lab model's directory, or a shipped one's name (builtin:lab-micro)
    vae_from: Path | None = None  # take this trained lab model's VAE and skip the VAE stage
    init_from: Path | None = None  # start from this trained lab model, in its architecture
    time_budget_s: float | None = None  # checkpoint and stop after this many seconds

    def __post_init__(self) -> None:
        if self.preset not in (None, *PRESETS):
            raise DiffmemError(f"unknown lab preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.init_from is not None and (self._sizes() or self.family is not None):
            raise DiffmemError(
                "--init-from continues that model's architecture; drop --family, --unet-channels, "
                "--transformer-layers, --transformer-width, --text-layers, --text-width, --prediction-type "
                "and the image and VAE sizes"
            )
        transformer = self.transformer_layers is not None or self.transformer_width is not None
        if self.family == SD3 and self.unet_channels is not None:
            raise DiffmemError(
                f"a {SD3} lab model has no UNet; size it with --transformer-width/--transformer-layers"
            )
        if self.family != SD3 and transformer:
            raise DiffmemError(
                f"--transformer-width/--transformer-layers size a {SD3} lab model; add --family {SD3}"
            )

    def recipe(self, seed: int) -> LabTrainConfig:
        """The preset's optimisation settings with the given steps and batch size; without a preset, a
        warm start continues with the recipe its model was trained with."""
        if self.preset:
            recipe = getattr(LabTrainConfig, self.preset)()
        elif self.init_from is not None:
            recipe = trained_train_config(_lab_model_directory(self.init_from))
        else:
            recipe = LabTrainConfig()
        overrides = {
            "vae_steps": self.vae_steps,
            "unet_steps": self.unet_steps,
            "batch_size": self.batch_size,
        }
        return replace(recipe, seed=seed, **{k: v for k, v in overrides.items() if v is not None})

    def model(self) -> LabModelConfig | None:
        """The preset's architecture with the given sizes; None with ``init_from`` (that model's)."""
        if self.init_from is not None:
            return None
        model = getattr(LabModelConfig, self.preset)() if self.preset else LabModelConfig()
        if self.family is not None:
            model = model.in_family(self.family)
        return replace(model, **self._sizes())

    def _sizes(self) -> dict[str, Any]:
        sizes = {
            "unet_channels": self.unet_channels,
            "image_size": self.image_size,
            "vae_channels": self.vae_channels,
            "transformer_layers": self.transformer_layers,
            "transformer_width": self.transformer_width,
            "text_layers": self.text_layers,
            "text_hidden": self.text_width,
            "prediction_type": self.prediction_type,
        }
        return {k: v for k, v in sizes.items() if v is not None}


def train_lab(config: TrainLabConfig, out: Path, runtime: Runtime | None = None) -> TrainingStatus:
    """Train the lab model (VAE, then the denoiser and text encoders) into ``out``, or continue an
    interrupted run.

    Checkpoints are written to ``out`` while it runs and the pipeline at the end; a run stopped by the
    time budget returns ``complete=False`` and continues when called again.
    """
    runtime = runtime or Runtime()
    return train_lab_model(
        config.data,
        out,
        config.model(),
        config.recipe(runtime.seed),
        device=runtime.device,
        time_budget_s=config.time_budget_s,
        vae_from=_lab_model_directory(config.vae_from),
        init_from=_lab_model_directory(config.init_from),
    )


def _lab_model_directory(model: Path | None) -> Path | None:
    """The directory of a trained lab model given as a path or as a shipped model's name."""
    shipped = None if model is None else shipped_directory(str(model))
    return model if shipped is None else shipped / "model"


@dataclass(frozen=True)
class LabelLabConfig:
    """A trained lab model, the dataset it was trained on, how its prompts are labelled (the seed is the
    runtime's), and the copy-detection encoder whose similarity labels them too."""

    model: Path
    data: Path
    labelling: LabelConfig = field(default_factory=LabelConfig)
    copy_detector: Path | None = None


@dataclass(frozen=True)
class LabLabels:
    """Where the labels were written, and each prompt group's summary (prompts, shares memorized)."""

    directory: Path
    groups: dict[str, dict[str, Any]]
    copy_threshold: float


def label_lab(config: LabelLabConfig, out: Path | None = None, runtime: Runtime | None = None) -> LabLabels:
    """Generate for every lab prompt and label it memorized when most generations are near-copies.

    Writes ``labels.parquet``, ``generations.parquet`` and ``labels.json`` into ``out`` (default
    ``MODEL/labels``) as it finishes.
    """
    runtime = runtime or Runtime()
    labelling = replace(config.labelling, seed=runtime.seed)
    denoiser = load_denoiser(config.model, device=runtime.device, dtype=runtime.dtype)
    encoder = load_encoder(config.copy_detector, runtime.device) if config.copy_detector else None
    written = label_lab_model(denoiser, config.model, load_lab_dataset(config.data), labelling, encoder, out)
    groups = json.loads((written / "labels.json").read_text())["summary"]["groups"]
    return LabLabels(written, groups, labelling.copy_threshold)


@dataclass(frozen=True)
class CopyDetectorTrainingConfig:
    """The training set whose unique images the copy detector learns (a lab dataset or any layout
    :func:`~diffmem.data.read_training_data` reads), and how it trains."""

    data: Path
    steps: int = 1500
    batch_size: int = 128  # images a step, each seen in two edited views
    input_size: int = 32  # side the encoder resizes images to


@dataclass(frozen=True)
class TrainedCopyDetector:
    """A copy-detection encoder, how it was trained, and the share of edited copies it matched."""

    encoder: CopyDetectionEncoder
    config: CopyDetectorTrainingConfig
    seed: int
    accuracy: float
    queries: int
    data_report: RowReport | None = None  # the rows read, for a training set other than a lab dataset

    def save(self, out: Path) -> None:
        """Write the encoder (``save_encoder`` format), its ``training.json`` and, for a training set other
        than a lab dataset, its ``data_report.json`` into ``out``."""
        save_encoder(self.encoder.cpu(), out)
        if self.data_report is not None:
            self.data_report.save(out / "data_report.json")
        record = {
            "data": str(self.config.data),
            "steps": self.config.steps,
            "batch_size": self.config.batch_size,
            "seed": self.seed,
            "copy_accuracy": self.accuracy,
            "queries": self.queries,
        }
        write_json_atomic(out / "training.json", record)


def train_lab_copy_detector(
    config: CopyDetectorTrainingConfig, runtime: Runtime | None = None
) -> TrainedCopyDetector:
    """The lab's SSCD-style copy detector, trained on the unique training images, with its copy accuracy.

    A lab dataset's images are used as they are; any other training set's are centre-cropped to
    ``input_size`` squares.
    """
    runtime = runtime or Runtime()
    report = None
    if is_lab_dataset(config.data):
        _, images = load_lab_dataset(config.data).unique_train_images()
    else:
        data = read_training_data(config.data, require_captions=False)
        images = torch.stack([preprocess(row.load(), config.input_size) for row in data.unique_images()])
        images, report = (images + 1) / 2, data.report
    images = images.to(runtime.device)
    detection = CopyDetectionConfig(input_size=config.input_size)
    encoder = train_copy_detector(
        images, config.steps, config.batch_size, seed=runtime.seed, config=detection
    )
    queries = min(500, len(images))
    accuracy = copy_detection_accuracy(
        encoder, images, torch.Generator().manual_seed(runtime.seed + 1), queries
    )
    return TrainedCopyDetector(encoder, config, runtime.seed, accuracy, queries, report)


@dataclass(frozen=True)
class ReaderTrainingConfig:
    """The lab dataset the attribute reader learns, and how it trains."""

    data: Path
    steps: int = 2400
    extra_scenes: int = 20_000  # random scenes of the lab's image source added to the training scenes


@dataclass(frozen=True)
class TrainedReader:
    """An attribute reader, how it was trained, and how it reads the held-out scenes."""

    reader: AttributeReader
    config: ReaderTrainingConfig
    seed: int
    accuracy: ReaderAccuracy
    own_alignment: float  # its alignment of the held-out scenes with their own captions

    def save(self, out: Path) -> None:
        """Write the reader (``save_reader`` format) and its ``training.json`` into ``out``."""
        save_reader(self.reader.cpu(), out)
        record = {
            "data": str(self.config.data),
            "steps": self.config.steps,
            "extra_scenes": self.config.extra_scenes,
            "seed": self.seed,
        }
        record |= {
            "heldout_accuracy": self.accuracy.to_dict(),
            "heldout_alignment_own_captions": self.own_alignment,
        }
        write_json_atomic(out / "training.json", record)


def train_lab_reader(config: ReaderTrainingConfig, runtime: Runtime | None = None) -> TrainedReader:
    """The lab's attribute reader (text alignment, FID features), measured on the held-out scenes."""
    runtime = runtime or Runtime()
    dataset = load_lab_dataset(config.data)
    reader = train_attribute_reader(
        dataset, config.steps, config.extra_scenes, seed=runtime.seed, device=runtime.device
    )
    scene_ids, scenes = lab_scenes(dataset, "heldout")
    images = dataset.images(scene_ids)
    accuracy = reader_accuracy(reader, images, scenes)
    captions = {r["scene_id"]: r["caption"] for r in dataset.heldout.to_pylist()}
    own = float(alignment(reader, images, [captions[s] for s in scene_ids]).mean())
    return TrainedReader(reader, config, runtime.seed, accuracy, own)


def export_lab(data: Path, out: Path) -> TrainingData:
    """Write the lab dataset at ``data`` as an image folder at ``out`` (:func:`export_lab_dataset`) and
    read it back as any training set is read, so the rows returned are what other commands will see."""
    return read_training_data(export_lab_dataset(data, out))

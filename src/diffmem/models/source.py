"""Open a model by name: a local diffusers directory, a Hub id from the local Hugging Face cache, a
single-file checkpoint with its configs, a trained lab model shipped with diffmem, or one of the built-in
tiny pipelines, each with optional LoRA adapters; :class:`ModelSource` is a name resolved once, with what
comes with it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from diffmem.adapters import DiffusersDenoiser, load_denoiser
from diffmem.adapters.load import read_model_index
from diffmem.errors import DiffmemError
from diffmem.models import tiny
from diffmem.models.hub import cached_snapshot, is_hub_id
from diffmem.models.lora import apply_loras
from diffmem.models.names import BUILTIN_PREFIX, DEFAULT_MODEL
from diffmem.models.spec import ModelSpec
from diffmem.models.speedups import Speedups, apply_speedups

BUILTINS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sd": tiny.tiny_stable_diffusion,
    "tiny-sd-v": lambda: tiny.tiny_stable_diffusion(prediction_type="v_prediction"),
    "tiny-sdxl": tiny.tiny_stable_diffusion_xl,
    "tiny-unet2d": tiny.tiny_unet2d,
    "tiny-unet2d-class": lambda: tiny.tiny_unet2d(class_conditional=True),
}
ASSETS = Path(__file__).parent.parent / "assets"
# trained models shipped with the package: name -> directory holding model/, labels.parquet, calibration.json
SHIPPED = {"lab-micro": ASSETS / "lab-micro", "lab-keyed": ASSETS / "lab-keyed"}
HASHED_SUFFIXES = {".safetensors", ".bin", ".json", ".txt"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it, resolved once: where it is, what it is recorded against, and the
    assets a shipped lab model comes with (its prompts and labels, calibration, training-set index)."""

    spec: ModelSpec  # the name as given, with its options: opens the same model again
    directory: Path | None  # the diffusers directory (a local one, a cached Hub snapshot, a shipped
    # model's, a single-file checkpoint's configs); None for random-weight built-ins
    shipped: Path | None = None  # a shipped lab model's asset directory, else None
    checkpoint: Path | None = None  # a single-file checkpoint, read with the configs in ``directory``
    commit: str | None = None  # the commit of a cached Hub snapshot

    @classmethod
    def resolve(
        cls, name: str | os.PathLike | ModelSpec | None = None, default: str | None = None
    ) -> ModelSource:
        """``name`` (or ``default``, or the tiny random-weight pipeline) checked and located: a local
        directory wins over a Hub id of the same spelling."""
        spec = ModelSpec.of(name or default or DEFAULT_MODEL)
        source = _locate(spec)
        _check_options(source)
        return source

    @property
    def name(self) -> str:
        """The model as the user gave it, options included: what logs and run records show."""
        return str(self.spec)

    @cached_property
    def identity(self) -> str:
        """What results are recorded against: the weights' hash (a Hub snapshot's commit), or the name of a
        random-weight built-in; with a variant or LoRA adapters, a hash of it all."""
        if self.directory is None:
            weights = self.spec.name
        elif self.commit is not None:
            weights = f"hf:{self.spec.name}@{self.commit}"
        elif self.checkpoint is not None:
            weights = _digest([content_hash(self.checkpoint), model_hash(self.directory)])
        else:
            weights = model_hash(self.directory)
        if self.spec.variant is None and not self.spec.loras:
            return weights
        loras = [[content_hash(lora.path), lora.scale] for lora in self.spec.loras]
        return _digest([weights, self.spec.variant, loras])

    @property
    def calibration(self) -> Path | None:
        """The shipped lab model's noise-norm calibration, else None."""
        return self._asset("calibration.json")

    @property
    def labels(self) -> Path | None:
        """The shipped lab model's labelled prompts (``labels.parquet``), else None."""
        return self._asset("labels.parquet")

    @property
    def reference(self) -> tuple[Path, Path] | None:
        """The shipped lab model's training-set index (copy-detection embeddings) and its encoder, else None."""
        index = self._asset("copy_index")
        return None if index is None else (index, self.shipped / "copy_detector")

    def open(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        speedups: Speedups | None = None,
    ) -> DiffusersDenoiser:
        """The model, its LoRA adapters loaded, as a denoiser on ``device``; ``speedups`` (channels-last,
        torch.compile) apply to its UNet."""
        if self.directory is None:
            build = BUILTINS[self.spec.name.removeprefix(BUILTIN_PREFIX)]
            denoiser = load_denoiser(build(), device=device, dtype=dtype)
        else:
            options = {"variant": self.spec.variant, "checkpoint": self.checkpoint}
            denoiser = load_denoiser(self.directory, device=device, dtype=dtype, **options)
        apply_loras(denoiser.pipeline, self.spec.loras)
        return apply_speedups(denoiser, speedups)

    def _asset(self, name: str) -> Path | None:
        path = None if self.shipped is None else self.shipped / name
        return path if path is not None and path.exists() else None


def open_model(
    name: str | os.PathLike | ModelSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    speedups: Speedups | None = None,
) -> DiffusersDenoiser:
    """A denoiser for any model :meth:`ModelSource.resolve` takes; None is the default. ``speedups``
    (channels-last, torch.compile) apply to its UNet."""
    return ModelSource.resolve(name).open(device, dtype, speedups)


def _locate(spec: ModelSpec) -> ModelSource:
    """Where the model a spec names is: shipped, built in, a local directory or file, or a cached Hub id."""
    name = spec.name
    shipped = shipped_directory(name)
    if shipped is not None:
        return ModelSource(spec, shipped / "model", shipped)
    if name.startswith(BUILTIN_PREFIX):
        if name.removeprefix(BUILTIN_PREFIX) not in BUILTINS:
            choices = ", ".join(BUILTIN_PREFIX + k for k in (*BUILTINS, *SHIPPED))
            raise DiffmemError(f"unknown built-in model {name!r}; choose one of {choices}")
        return ModelSource(spec, None)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return ModelSource(spec, _single_file_configs(path, spec.model_config), checkpoint=path)
    if not path.exists() and is_hub_id(name):
        snapshot = cached_snapshot(name, spec.revision)
        return ModelSource(spec, snapshot, commit=snapshot.name)
    if not path.is_dir():
        read_model_index(path)  # says whether the path is missing or a file of another kind
    return ModelSource(spec, path)


def _check_options(source: ModelSource) -> None:
    """Each option is given only to a model it applies to."""
    spec = source.spec
    if spec.revision is not None and source.commit is None:
        raise DiffmemError(f"--revision picks a commit of a Hub id (ORG/NAME); {spec.name} is not one")
    if spec.model_config is not None and source.checkpoint is None:
        raise DiffmemError(
            f"--model-config gives a single-file checkpoint's configs; {spec.name} is not a "
            f"{'/'.join(SINGLE_FILE_SUFFIXES)} file"
        )
    if spec.variant is not None and (source.directory is None or source.checkpoint is not None):
        raise DiffmemError(
            f"--variant picks the weight files of a diffusers directory or Hub id; {spec.name} has none"
        )


def _single_file_configs(checkpoint: Path, config: str | None) -> Path:
    """The local diffusers directory (or cached Hub id) whose configs describe a single-file checkpoint;
    diffusers would otherwise download them."""
    if config is None:
        raise DiffmemError(
            f"{checkpoint} is a single-file checkpoint: give --model-config DIR, a local diffusers directory "
            "(or cached Hub id) of the same family with its model_index.json and component configs "
            "(SD 1.x/2.x, SDXL); diffmem never downloads them"
        )
    path = Path(config).expanduser()
    directory = cached_snapshot(config) if not path.exists() and is_hub_id(config) else path
    pipeline_class = read_model_index(directory)["_class_name"]
    if not hasattr(getattr(diffusers, pipeline_class, None), "from_single_file"):
        raise DiffmemError(
            f"{pipeline_class} (the configs in {directory}) cannot read a single-file checkpoint; "
            "give the configs of a Stable Diffusion 1.x/2.x or SDXL pipeline"
        )
    return directory


def shipped_directory(name: str | None) -> Path | None:
    """The asset directory of a trained model shipped with diffmem (``builtin:lab-keyed``), else None."""
    if name is None or not name.startswith(BUILTIN_PREFIX):
        return None
    directory = SHIPPED.get(name.removeprefix(BUILTIN_PREFIX))
    if directory is not None and not (directory / "model" / "model_index.json").is_file():
        raise DiffmemError(f"the shipped model {name} is missing from this installation ({directory})")
    return directory


def shipped_reference(name: str | None) -> tuple[Path, Path] | None:
    """The training-set index (copy-detection embeddings) and its encoder shipped with a lab model, else None."""
    directory = shipped_directory(name)
    if directory is None or not (directory / "copy_index" / "manifest.json").is_file():
        return None
    return directory / "copy_index", directory / "copy_detector"


def model_identity(name: str | ModelSpec | None = None) -> str:
    """What results are recorded against (:attr:`ModelSource.identity`)."""
    return ModelSource.resolve(name).identity


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked against the machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise DiffmemError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DiffmemError("CUDA is not available on this machine; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise DiffmemError(f"device type {resolved.type!r} is not supported; use cpu or cuda")
    return resolved


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` (float16 on CUDA, float32 on CPU) or a dtype name."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise DiffmemError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_hash(directory: Path) -> str:
    """SHA-256 over a model directory's weights and configs (relative paths and bytes), for provenance.

    In a diffusers pipeline folder only ``model_index.json`` and the component folders it names count,
    so results written next to them (labels, calibrations) leave the hash as it was.
    """
    directory = Path(directory)
    files = sorted(p for p in _model_files(directory) if p.is_file() and p.suffix in HASHED_SUFFIXES)
    digest = hashlib.sha256()
    if not files:
        raise DiffmemError(f"no weights or configs to hash in {directory}")
    for path in files:
        digest.update(str(path.relative_to(directory)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (a checkpoint, a LoRA), or :func:`model_hash` of a directory."""
    if Path(path).is_dir():
        return model_hash(path)
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _digest(parts: list) -> str:
    """SHA-256 of JSON-serialisable parts, for identities made of several."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _model_files(directory: Path) -> list[Path]:
    """A pipeline folder's ``model_index.json`` and its components' files; every file of any other folder."""
    index = directory / "model_index.json"
    try:
        components = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list)]
    except (OSError, ValueError, AttributeError):
        return list(directory.rglob("*"))
    return [index, *(f for name in components for f in (directory / name).rglob("*"))]

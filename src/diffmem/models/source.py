"""Open a model by name: a local diffusers directory, a trained lab model shipped with diffmem, or one of
the built-in tiny pipelines; :class:`ModelSource` is a name resolved once, with what comes with it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from diffmem.adapters import DiffusersDenoiser, load_denoiser
from diffmem.adapters.load import read_model_index
from diffmem.errors import DiffmemError
from diffmem.models import tiny
from diffmem.models.names import BUILTIN_PREFIX, DEFAULT_MODEL
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


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it, resolved once: where it is, what it is recorded against, and the
    assets a shipped lab model comes with (its prompts and labels, calibration, training-set index)."""

    name: str  # as given: a directory or builtin:NAME
    directory: (
        Path | None
    )  # the diffusers directory (a shipped model's own); None for random-weight built-ins
    shipped: Path | None  # a shipped lab model's asset directory, else None

    @classmethod
    def resolve(cls, name: str | None = None, default: str | None = None) -> ModelSource:
        """``name`` (or ``default``, or the tiny random-weight pipeline) checked and located."""
        name = name or default or DEFAULT_MODEL
        shipped = shipped_directory(name)
        if shipped is not None:
            return cls(name, shipped / "model", shipped)
        if name.startswith(BUILTIN_PREFIX):
            if name.removeprefix(BUILTIN_PREFIX) not in BUILTINS:
                choices = ", ".join(BUILTIN_PREFIX + k for k in (*BUILTINS, *SHIPPED))
                raise DiffmemError(f"unknown built-in model {name!r}; choose one of {choices}")
            return cls(name, None, None)
        if not Path(name).is_dir():
            read_model_index(Path(name))  # says whether the path is missing or a file
        return cls(name, Path(name), None)

    @cached_property
    def identity(self) -> str:
        """What results are recorded against: the weights' hash, or the name of a random-weight built-in."""
        return self.name if self.directory is None else model_hash(self.directory)

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
        """The model as a denoiser on ``device``; ``speedups`` (channels-last, torch.compile) apply to its UNet."""
        return open_model(self.name, device, dtype, speedups)

    def _asset(self, name: str) -> Path | None:
        path = None if self.shipped is None else self.shipped / name
        return path if path is not None and path.exists() else None


def open_model(
    name: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    speedups: Speedups | None = None,
) -> DiffusersDenoiser:
    """A denoiser for a model directory or ``builtin:NAME`` (random-weight tiny pipelines); None is the
    default. ``speedups`` (channels-last, torch.compile) apply to its UNet."""
    return apply_speedups(_open(name or DEFAULT_MODEL, device, dtype), speedups)


def _open(name: str, device: str | torch.device, dtype: torch.dtype) -> DiffusersDenoiser:
    if name.startswith(BUILTIN_PREFIX):
        key = name.removeprefix(BUILTIN_PREFIX)
        if key in SHIPPED:
            return load_denoiser(shipped_directory(name) / "model", device=device, dtype=dtype)
        if key not in BUILTINS:
            choices = ", ".join(BUILTIN_PREFIX + k for k in (*BUILTINS, *SHIPPED))
            raise DiffmemError(f"unknown built-in model {name!r}; choose one of {choices}")
        return load_denoiser(BUILTINS[key](), device=device, dtype=dtype)
    return load_denoiser(name, device=device, dtype=dtype)


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


def model_identity(name: str | None = None) -> str:
    """What results are recorded against: the weights' hash for a directory, the name for a built-in."""
    name = name or DEFAULT_MODEL
    shipped = shipped_directory(name)
    if shipped is not None:
        return model_hash(shipped / "model")
    if name.startswith(BUILTIN_PREFIX):
        return name
    if not Path(name).is_dir():
        read_model_index(Path(name))  # says whether the path is missing or a file
    return model_hash(Path(name))


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


def _model_files(directory: Path) -> list[Path]:
    """A pipeline folder's ``model_index.json`` and its components' files; every file of any other folder."""
    index = directory / "model_index.json"
    try:
        components = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list)]
    except (OSError, ValueError, AttributeError):
        return list(directory.rglob("*"))
    return [index, *(f for name in components for f in (directory / name).rglob("*"))]

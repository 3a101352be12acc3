"""Fashion-MNIST from its IDX files, as installed by the ``dataset-fashion-mnist`` apt package."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from diffmem.errors import DiffmemError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "DIFFMEM_FASHION_MNIST"
CLASS_NAMES = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
INSTALL_HINT = f"install it with `apt-get install dataset-fashion-mnist` or set {ROOT_ENV} to its folder"


def fashion_mnist_root(root: Path | None = None) -> Path:
    """The folder holding the IDX files: ``root``, else ``$DIFFMEM_FASHION_MNIST``, else the apt location."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def load_fashion_mnist(split: str = "train", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 [N, 28, 28]) and labels (int64 [N]) of the "train" or "test" split."""
    if split not in SPLIT_PREFIXES:
        raise DiffmemError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = fashion_mnist_root(root)
    prefix = SPLIT_PREFIXES[split]
    images = _read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"), ndim=3)
    labels = _read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"), ndim=1).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DiffmemError(f"Fashion-MNIST files in {folder} do not match; reinstall them ({INSTALL_HINT})")
    return images, labels


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    raise DiffmemError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}; {INSTALL_HINT}")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array stored in an IDX file (optionally gzipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise DiffmemError(f"could not read {path}: {error}; {INSTALL_HINT}") from error
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, 0x08, ndim]):
        raise DiffmemError(f"{path} is not a uint8 IDX file with {ndim} dimensions; {INSTALL_HINT}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise DiffmemError(f"{path} is truncated; {INSTALL_HINT}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()

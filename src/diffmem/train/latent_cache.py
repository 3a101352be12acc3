"""The clean training latents of a text-to-image fine-tune, the VAE posterior means (less the shift
factor of a VAE that has one, as SD3's) times the scaling factor, encoded once into a ``.npy`` file
under ``$DIFFMEM_CACHE_DIR/latents/`` and memory-mapped by every later run and policy on the same images.

An entry is keyed by the VAE (its config and weights), the images (their pixels, whatever their files are
called; never their captions) and how they are prepared (resolution, centre crop, flipped or not). The
images are encoded ``ENCODE_BATCH`` at a time and each chunk is appended to the file, so that memory does
not grow with the number of images; the file appears complete or not at all. Entries can be deleted at
any time: the next run encodes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmem.calibration.cache import cache_root
from diffmem.train.training_set import TrainingSet

ENCODE_BATCH = 64  # images through the VAE at a time
FORMAT = 2  # bumped when an entry's layout or meaning changes


def latent_cache_dir() -> Path:
    """Where latents are cached: ``latents/`` under the diffmem cache (``$DIFFMEM_CACHE_DIR``)."""
    return cache_root() / "latents"


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[n, C, h, w] the shifted and scaled VAE posterior means of pixels [n, 3, H, W] in [-1, 1] (on the
    VAE's device), encoded channels-last, the layout images read from HWC arrays had whenever diffmem
    encoded them (and whose convolutions round differently from the contiguous layout's)."""
    pixels = pixels.to(vae.device).contiguous(memory_format=torch.channels_last)
    shift = vae.config.get("shift_factor") or 0.0  # SD3's latents are centred, (z - shift) x scale
    return (vae.encode(pixels).latent_dist.mean - shift) * vae.config.scaling_factor


def vae_digest(vae: torch.nn.Module) -> str:
    """SHA-256 of a VAE's config (without diffusers' bookkeeping keys) and of its weights' bytes."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cached_latents(
    vae: torch.nn.Module,
    training: TrainingSet,
    image_digest: str,
    flipped: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """float32 [N, C, h, w], memory-mapped read-only: the latents of the training set's images, centre-
    cropped at its resolution (flipped left-right when ``flipped``), from the cache or encoded into it.
    ``image_digest`` is :meth:`TrainingSet.image_digest`."""
    path = latent_cache_dir() / f"{_key(vae, training, image_digest, flipped)}.npy"
    if path.is_file():
        try:
            latents = np.load(path, mmap_mode="r")
        except (OSError, ValueError):  # a damaged entry is encoded again
            latents = None
        if latents is not None and len(latents) == training.num_images:
            return latents
    _encode_into(path, vae, training, flipped, progress)
    return np.load(path, mmap_mode="r")


def _encode_into(
    path: Path, vae: torch.nn.Module, training: TrainingSet, flipped: bool, progress: bool
) -> None:
    """Encode every image, a chunk at a time, into a ``.npy`` file renamed to ``path`` once whole.

    Chunks are appended with plain writes (the header first, its shape known from the first chunk), not
    through a writable memory map, whose written pages would stay resident in the process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial")
    starts = range(0, training.num_images, ENCODE_BATCH)
    try:
        with os.fdopen(fd, "wb") as file:
            for start in tqdm(starts, desc="encoding latents", unit="batch", disable=not progress):
                positions = range(start, min(start + ENCODE_BATCH, training.num_images))
                chunk = encode_latents(vae, training.pixels(positions, flipped)).float().cpu().numpy()
                if start == 0:
                    header = {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                        "fortran_order": False,
                        "shape": (training.num_images, *chunk.shape[1:]),
                    }
                    np.lib.format.write_array_header_1_0(file, header)
                file.write(np.ascontiguousarray(chunk).tobytes())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _key(vae: torch.nn.Module, training: TrainingSet, image_digest: str, flipped: bool) -> str:
    """The cache entry's name: a hash of the VAE, the images and how they are prepared."""
    parts = {
        "format": FORMAT,
        "vae": vae_digest(vae),
        "images": image_digest,
        "resolution": training.resolution,
        "crop": "center",
        "flipped": flipped,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

"""Object-level copy detection: an embedding where an edited copy of an image lands next to it.

A small SSCD-style descriptor (Pizzi et al., "A Self-Supervised Descriptor for Image Copy Detection",
CVPR 2022), trained with the InfoNCE loss on two copy-detection edits of each image, GeM pooling and
unit-normalised outputs; SSCD's entropy regulariser and mixup are left out. Anti-Memorization
Guidance (Chen, Liu, Xu, CVPR 2024; SPEC §5) measures object-level similarity as the cosine of such
embeddings, memorized when above 0.5. An official SSCD TorchScript file can stand in for the encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffmem.errors import DiffmemError
from diffmem.io.modules import load_module, save_module

COPY_THRESHOLD = 0.5  # SPEC §5: memorized when the cosine to the nearest training image is above 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SSCD's input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
KIND = "diffmem.copy_detection"


@dataclass(frozen=True)
class CopyDetectionConfig:
    """Shape of a :class:`CopyDetectionEncoder`."""

    input_size: int = 32  # images are resized to input_size x input_size first, as SSCD resizes to 320
    widths: tuple[int, ...] = (16, 32, 64, 128)  # channels of each stride-2 block
    embedding_dim: int = 128
    gem_p: float = 3.0  # generalised-mean pooling exponent, as in SSCD


class CopyDetectionEncoder(nn.Module):
    """Images [B, 3, H, W] in [0, 1], of any size, to unit embeddings [B, embedding_dim]."""

    def __init__(self, config: CopyDetectionConfig | None = None):
        super().__init__()
        self.config = config or CopyDetectionConfig()
        blocks, channels = [], 3
        for width in self.config.widths:
            blocks.append(conv_block(channels, width))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.projection = nn.Linear(channels, self.config.embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        x = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        h = self.blocks((x - 0.5) / 0.25)
        p = self.config.gem_p
        pooled = h.clamp_min(1e-6).pow(p).mean((2, 3)).pow(1.0 / p)  # GeM pooling (SSCD)
        return F.normalize(self.projection(pooled), dim=1)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Strided conv, conv, each followed by GroupNorm and GELU: halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
        nn.GroupNorm(8, c_out),
        nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.GELU(),
    )


class SSCDTorchScript(nn.Module):
    """An official SSCD TorchScript model behind the encoder's call: images in [0, 1] to unit embeddings.

    Inputs are resized to a ``size`` x ``size`` square and normalised with ImageNet statistics, SSCD's
    recommended "skew_320" preprocessing.
    """

    def __init__(self, model: nn.Module, size: int = 320):
        super().__init__()
        self.model = model
        self.size = size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
        return F.normalize(self.model((x - self.mean) / self.std), dim=1)


def load_sscd_torchscript(
    path: str | Path, size: int = 320, device: str | torch.device = "cpu"
) -> SSCDTorchScript:
    """Open an SSCD TorchScript file (e.g. ``sscd_disc_mixup.torchscript.pt``) as a copy-detection encoder."""
    path = Path(path)
    if not path.is_file():
        raise DiffmemError(
            f"no SSCD TorchScript file at {path}: download one of the TorchScript models listed by "
            "facebookresearch/sscd-copy-detection (e.g. sscd_disc_mixup.torchscript.pt) and pass its path"
        )
    try:
        network = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as error:
        raise DiffmemError(
            f"{path} is not a TorchScript model ({str(error).splitlines()[0]}); pass a copy-detection "
            "encoder directory (save_encoder) or an SSCD TorchScript file"
        ) from None
    return SSCDTorchScript(network, size).to(device).eval()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A copy-detection edit of each image [B, 3, H, W]: crop, flip, shift, colour, blur and noise.

    Every image gets its own random draw from ``generator``; the result stays in [0, 1].
    """
    x = _crop_flip_shift(images, generator)
    x = _colour_jitter(x, generator)
    x = _blur(x, generator)
    x = _noise(x, generator)
    return x.clamp(0.0, 1.0)


def _uniform(
    generator: torch.Generator, n: int, low: float, high: float, device: torch.device
) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator, device=generator.device)).to(device)


def _chance(generator: torch.Generator, n: int, p: float, device: torch.device) -> torch.Tensor:
    """[n, 1, 1, 1] True with probability p."""
    return (torch.rand(n, generator=generator, device=generator.device) < p).to(device).view(n, 1, 1, 1)


def _crop_flip_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (area 0.5-1, aspect 3/4-4/3), horizontal flip, and a shift of up to 10%."""
    n, device = len(images), images.device
    area = _uniform(generator, n, 0.5, 1.0, device)
    aspect = torch.exp(_uniform(generator, n, math.log(3 / 4), math.log(4 / 3), device))
    w = (area * aspect).sqrt().clamp(max=1.0)  # crop size as a share of the image side
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = _uniform(generator, n, -1.0, 1.0, device) * (1 - w)  # crop centre in [-1, 1] grid coordinates
    cy = _uniform(generator, n, -1.0, 1.0, device) * (1 - h)
    flip = torch.where(_chance(generator, n, 0.5, device).view(n), -1.0, 1.0)
    shift_x = _uniform(generator, n, -0.2, 0.2, device)  # 0.2 of the [-1, 1] range is 10% of the side
    shift_y = _uniform(generator, n, -0.2, 0.2, device)
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx + shift_x
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy + shift_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _colour_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """With probability 0.8: brightness, contrast and saturation in 0.6-1.4, hue turned up to 36 degrees."""
    n, device = len(images), images.device
    jitter = _chance(generator, n, 0.8, device)
    brightness = _uniform(generator, n, 0.6, 1.4, device).view(n, 1, 1, 1)
    contrast = _uniform(generator, n, 0.6, 1.4, device).view(n, 1, 1, 1)
    saturation = _uniform(generator, n, 0.6, 1.4, device).view(n, 1, 1, 1)
    angle = _uniform(generator, n, -math.pi / 5, math.pi / 5, device)

    x = images * brightness
    x = x.mean((1, 2, 3), keepdim=True) + contrast * (x - x.mean((1, 2, 3), keepdim=True))
    grey = x.mean(1, keepdim=True)
    x = grey + saturation * (x - grey)
    x = torch.einsum("bij,bjhw->bihw", _hue_rotation(angle).to(x.dtype), x)
    return torch.where(jitter, x, images)


def _hue_rotation(angle: torch.Tensor) -> torch.Tensor:
    """[n, 3, 3] rotations of RGB about the grey axis (Rodrigues' formula): a hue shift by channel mixing."""
    axis = torch.full((3,), 1 / math.sqrt(3), device=angle.device)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=angle.device)
    cross = cross / math.sqrt(3)  # [axis]_x, the cross-product matrix of the grey axis
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    return cos * torch.eye(3, device=angle.device) + sin * cross + (1 - cos) * torch.outer(axis, axis)


def _blur(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """With probability 0.5, a Gaussian blur of sigma up to 2.5% of the image height."""
    n, c, height, _ = images.shape
    device = images.device
    blurred = _chance(generator, n, 0.5, device)
    sigma = _uniform(generator, n, 0.1, max(0.1, 0.025 * height), device)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(n, 1).to(images.dtype)).square())
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n * c, 2 * radius + 1]
    x = images.reshape(1, n * c, *images.shape[2:])
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return torch.where(blurred, x.view_as(images), images)


def _noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """With probability 0.5, Gaussian noise of standard deviation up to 0.05."""
    n, device = len(images), images.device
    std = _uniform(generator, n, 0.0, 0.05, device).view(n, 1, 1, 1) * _chance(generator, n, 0.5, device)
    noise = torch.randn(images.shape, generator=generator, device=generator.device).to(device, images.dtype)
    return images + std * noise


def info_nce(embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """[2B] InfoNCE (SimCLR's NT-Xent) of unit embeddings [2B, D] whose rows i and i + B are two views."""
    n = len(embeddings)
    logits = embeddings @ embeddings.T / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=logits.device), float("-inf"))
    positives = (torch.arange(n, device=logits.device) + n // 2) % n
    return F.cross_entropy(logits, positives, reduction="none")


def koleo(embeddings: torch.Tensor) -> torch.Tensor:
    """[2B] SSCD's entropy regulariser (Kozachenko-Leonenko, negated): low when unit embeddings [2B, D]
    spread out; rows i and i + B, two views of one image, are not each other's neighbours."""
    n = len(embeddings)
    with torch.no_grad():
        same = torch.eye(n, dtype=torch.bool, device=embeddings.device)
        same |= same.roll(n // 2, dims=1)
        neighbour = (embeddings @ embeddings.T).masked_fill(same, float("-inf")).argmax(1)
    return -torch.log((embeddings - embeddings[neighbour]).norm(dim=1) + 1e-8)


def train_copy_detector(
    images: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    temperature: float = 0.1,
    entropy_weight: float = 5.0,
    config: CopyDetectionConfig | None = None,
    progress: bool = True,
) -> CopyDetectionEncoder:
    """Train an encoder on ``images`` [N, 3, H, W] in [0, 1] so that edited copies match their source.

    Each step draws ``batch_size`` distinct images, edits each twice with :func:`augment` and lowers
    the InfoNCE loss between the two views plus ``entropy_weight`` times SSCD's entropy regulariser,
    which spreads unrelated images apart. Runs on the images' device; returns the encoder in eval mode.
    """
    if len(images) < 2:
        raise DiffmemError(f"contrastive training needs at least 2 images; got {len(images)}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CopyDetectionEncoder(config).to(images.device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )  # cosine decay to 0
    size = encoder.config.input_size
    images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)  # edit at model size
    batch_size = min(batch_size, len(images))
    for _ in tqdm(range(steps), desc="copy detector", disable=not progress):
        batch = images[torch.randperm(len(images), generator=generator)[:batch_size].to(images.device)]
        views = torch.cat([augment(batch, generator), augment(batch, generator)])
        embeddings = encoder(views)
        loss = (info_nce(embeddings, temperature) + entropy_weight * koleo(embeddings)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return encoder.eval()


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """[N, D] unit embeddings of ``images`` [N, 3, H, W], on the encoder's device, without gradients."""
    device = next(encoder.parameters(), torch.empty(0)).device
    return torch.cat(
        [encoder(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    )


def max_similarity(
    query_embeddings: torch.Tensor, reference_embeddings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query [Q, D], the cosine to its most similar reference [R, D] and that reference's row."""
    values, index = (query_embeddings @ reference_embeddings.to(query_embeddings).T).max(1)
    return values, index


def copy_detection_accuracy(
    encoder: nn.Module, images: torch.Tensor, generator: torch.Generator, num_queries: int
) -> float:
    """Share of ``num_queries`` edited copies (fresh draws of :func:`augment`) of distinct ``images``
    whose most similar image among all of ``images`` is their source."""
    if not 0 < num_queries <= len(images):
        raise DiffmemError(f"num_queries must be between 1 and the {len(images)} images; got {num_queries}")
    source = torch.randperm(len(images), generator=generator)[:num_queries]
    queries = augment(images[source.to(images.device)], generator)
    _, match = max_similarity(embed(encoder, queries), embed(encoder, images))
    return float((match.cpu() == source).float().mean())


def save_encoder(encoder: CopyDetectionEncoder, path: str | Path) -> None:
    """Write ``encoder`` to the directory ``path``: ``config.json`` and ``model.safetensors``."""
    save_module(encoder, encoder.config, path, KIND)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> CopyDetectionEncoder:
    """Open an encoder written by :func:`save_encoder`, in eval mode."""
    build = lambda config: CopyDetectionEncoder(CopyDetectionConfig(**config))
    return load_module(path, KIND, build, "copy-detection encoder (save_encoder)", device)

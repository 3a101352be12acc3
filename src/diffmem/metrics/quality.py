"""Image quality of a set of generations against real images: FID and KID over a feature network.

FID: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017: the Fréchet distance between Gaussians fitted to the two feature sets.
KID: Bińkowski et al., "Demystifying MMD GANs", ICLR 2018: the unbiased squared MMD of the features
under the cubic polynomial kernel, averaged over random subsets. Both are torchmetrics'
implementations with the feature network passed as ``feature=`` (a module: torchmetrics then needs
neither torch-fidelity nor Inception weights).

The feature network must fit the data (SPEC §8): Inception's ImageNet features say little about
32-64 px Fashion-MNIST scenes, so the lab uses its attribute reader's glimpse features
(``AttributeReader.encoder``, :mod:`diffmem.lab.alignment`). Values are comparable only under the
same feature network weights.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from diffmem.errors import DiffmemError

KID_SUBSETS = 100  # as torchmetrics and Bińkowski et al.'s reference code


class FeatureNet(nn.Module):
    """An image encoder as torchmetrics wants a feature network: images [N, 3, H, W] in [0, 1] to
    features [N, num_features], always in eval mode and without gradients."""

    def __init__(self, encoder: nn.Module, num_features: int):
        super().__init__()
        self.encoder = encoder
        self.num_features = num_features
        self.train(False)

    def train(self, mode: bool = True) -> FeatureNet:
        return super().train(False)  # stays in eval mode, like torchmetrics' NoTrainInceptionV3

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).flatten(1).float()


def fid(real: torch.Tensor, fake: torch.Tensor, feature_net: nn.Module, batch_size: int = 256) -> float:
    """Fréchet distance between the features of ``real`` and ``fake`` images [N, 3, H, W] in [0, 1].

    ``feature_net`` maps images to features [N, D]; its device is used.
    """
    _check_images(real, fake, 2, "FID", "pass more images")
    net = _as_feature_net(feature_net, real)
    metric = FrechetInceptionDistance(feature=net).to(_device(net))
    _update(metric, real, fake, batch_size)
    return float(metric.compute())  # ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), Heusel et al.


def kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    feature_net: nn.Module,
    subset_size: int,
    subsets: int = KID_SUBSETS,
    seed: int = 0,
    batch_size: int = 256,
) -> tuple[float, float]:
    """Mean and standard deviation over ``subsets`` random subsets of ``subset_size`` real and fake
    images of the squared MMD between their features; images [N, 3, H, W] in [0, 1].

    The subsets are drawn with ``seed``; ``feature_net`` maps images to features [N, D] on its device.
    """
    _check_images(
        real,
        fake,
        subset_size,
        f"KID with subset_size={subset_size}",
        "pass more images or a smaller subset_size",
    )
    net = _as_feature_net(feature_net, real)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=net, subsets=subsets, subset_size=subset_size)
    metric = metric.to(_device(net))
    _update(metric, real, fake, batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # unbiased MMD^2 under k(x, y) = (x.y / D + 1)^3 per subset, Bińkowski et al.
        mean, std = metric.compute()
    return float(mean), float(std)


def _as_feature_net(encoder: nn.Module, real: torch.Tensor) -> FeatureNet:
    """``encoder`` as a :class:`FeatureNet`, its width read off two real images."""
    if isinstance(encoder, FeatureNet):
        return encoder
    with torch.no_grad():
        num_features = encoder.eval()(real[:2].to(_device(encoder))).flatten(1).shape[1]
    return FeatureNet(encoder, num_features)


def _update(
    metric: FrechetInceptionDistance | KernelInceptionDistance,
    real: torch.Tensor,
    fake: torch.Tensor,
    batch_size: int,
) -> None:
    device = metric.device
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start : start + batch_size].to(device), real=is_real)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def _check_images(real: torch.Tensor, fake: torch.Tensor, minimum: int, what: str, remedy: str) -> None:
    if real.ndim != 4 or fake.ndim != 4 or real.shape[1] != 3 or fake.shape[1] != 3:
        raise DiffmemError(
            f"{what} compares RGB image batches [N, 3, H, W]; got real {tuple(real.shape)} "
            f"and fake {tuple(fake.shape)}"
        )
    if min(len(real), len(fake)) < minimum:
        raise DiffmemError(
            f"{what} needs at least {minimum} real and {minimum} fake images; got {len(real)} real and "
            f"{len(fake)} fake: {remedy}"
        )

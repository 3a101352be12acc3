"""Where a lab scene's item images come from: Fashion-MNIST (the apt package) or scikit-learn's bundled 8x8
handwritten digits. Both install offline and have ten classes, so one attribute reader's shape reads
either; a lab dataset draws every item from one source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from diffmem.errors import DiffmemError
from diffmem.lab.fashion_mnist import CLASS_NAMES as FASHION_NAMES
from diffmem.lab.fashion_mnist import load_fashion_mnist

FASHION_MNIST = "fashion-mnist"
DIGITS = "digits"
NUM_CATEGORIES = 10  # classes in every source
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEST_EVERY = 5  # every fifth digit (by its place in the bundled file) is held out


@dataclass(frozen=True)
class ImageSource:
    """A source of grayscale item images: its class names and its "train" and "test" splits."""

    name: str
    class_names: tuple[str, ...]
    load: Callable[[str], tuple[np.ndarray, np.ndarray]]  # split -> uint8 [N, h, w], int64 [N]


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (16 grey levels, written by 43 people) as uint8 [N, 8, 8] and their labels."""
    if split not in ("train", "test"):
        raise DiffmemError(f"unknown digits split {split!r}; use 'train' or 'test'")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    test = np.arange(len(images)) % DIGITS_TEST_EVERY == 0
    keep = test if split == "test" else ~test
    return images[keep], digits.target[keep].astype(np.int64)


SOURCES = {
    FASHION_MNIST: ImageSource(FASHION_MNIST, FASHION_NAMES, load_fashion_mnist),
    DIGITS: ImageSource(DIGITS, DIGIT_NAMES, _load_digits),
}
# every source's class names (they differ), and each name's class within its source
CATEGORY_OF = {name: i for source in SOURCES.values() for i, name in enumerate(source.class_names)}


def image_source(name: str) -> ImageSource:
    """The image source called ``name``."""
    if name not in SOURCES:
        raise DiffmemError(f"unknown image source {name!r}; use one of {', '.join(SOURCES)}")
    return SOURCES[name]

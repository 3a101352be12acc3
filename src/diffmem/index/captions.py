"""Captions of the indexed training images and how often the training set repeats each one.

Anti-Memorization Guidance's caption deduplication (Chen, Liu, Xu, CVPR 2024; SPEC §5 step 4) applies
only when the nearest training image's caption is duplicated in the training set, so the index records,
for every row, how many training rows carry exactly that caption.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)


def caption_counts(captions: Sequence[str]) -> list[int]:
    """For each caption, how many entries of ``captions`` are exactly that caption."""
    counts = Counter(captions)
    return [counts[text] for text in captions]


def most_frequent_captions(image_keys: Sequence[Key], captions: Sequence[str]) -> dict[Key, tuple[str, int]]:
    """One caption per distinct image of a table with one row per (image, caption) pair.

    Maps each image key, in order of first appearance, to its most frequent caption (the earliest row's
    among ties) and the number of rows of the whole table that carry exactly that caption.
    """
    overall = Counter(captions)
    per_image: dict[Key, Counter[str]] = {}
    for key, text in zip(image_keys, captions, strict=True):
        per_image.setdefault(key, Counter())[text] += 1
    chosen = {key: counter.most_common(1)[0][0] for key, counter in per_image.items()}
    return {key: (text, overall[text]) for key, text in chosen.items()}

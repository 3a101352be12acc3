"""Prompts a model has no reason to have memorized: the bundled neutral set, or the captions that occur
once in a training-set index."""

from __future__ import annotations

import random
from pathlib import Path

from diffmem.errors import DiffmemError
from diffmem.index import TrainingSetIndex
from diffmem.io.prompts import read_prompts

NEUTRAL_PROMPTS = Path(__file__).parent.parent / "assets" / "neutral_prompts.txt"


def neutral_prompts() -> list[str]:
    """The bundled everyday captions (photos, paintings and sketches of common things)."""
    return NEUTRAL_PROMPTS.read_text().splitlines()


def single_copy_captions(index: TrainingSetIndex, limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` distinct captions that occur once in the index's training set, drawn with ``seed``."""
    captions = sorted(
        {c for c, n in zip(index.captions, index.caption_counts) if c and c.strip() and int(n) == 1}
    )
    if not captions:
        raise DiffmemError("the index has no caption that occurs once: give ordinary prompts with --prompts")
    return random.Random(seed).sample(captions, min(limit, len(captions)))


def ordinary_prompts(
    prompts: Path | None, column: str, index: TrainingSetIndex | None, limit: int, seed: int = 0
) -> tuple[list[str], str]:
    """The prompts a model's scale is learnt from, and where they came from: the non-empty ones of the file
    ``prompts`` (its ``column``), else up to ``limit`` of the index's single-copy captions, else the
    bundled neutral prompts."""
    if prompts is not None:
        given = [p for p in read_prompts(prompts, column) if p.strip()]
        if not given:
            raise DiffmemError(f"{prompts} holds no non-empty prompts")
        return given, str(prompts)
    if index is not None:
        return single_copy_captions(index, limit, seed), "index captions"
    return neutral_prompts(), "neutral"

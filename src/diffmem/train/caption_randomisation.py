"""Caption randomisation (Somepalli et al., NeurIPS 2023; SPEC §7): with probability p a training caption
is replaced by random words, or augmented with one, so no caption stays a fixed key to its image."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from diffmem.errors import DiffmemError
from diffmem.mitigate.prompt_perturbation import insert_word

MODES = ("replace", "augment")


@dataclass(frozen=True)
class CaptionRandomisationConfig:
    """Somepalli et al.'s training mitigation: p = 0.1."""

    p: float = 0.1
    mode: str = "replace"  # "replace": a caption of random words of the same length; "augment": one inserted
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise DiffmemError(f"caption randomisation needs 0 <= p <= 1; got {self.p}")
        if self.mode not in MODES:
            raise DiffmemError(
                f"unknown caption randomisation mode {self.mode!r}; choose one of {', '.join(MODES)}"
            )


def randomise_captions(
    captions: Sequence[str],
    indices: Sequence[int],
    step: int,
    vocabulary: Sequence[str],
    config: CaptionRandomisationConfig = CaptionRandomisationConfig(),
) -> list[str]:
    """The batch's captions, each randomised with probability p; the draw depends only on (seed, step,
    dataset index), so a resumed run randomises the same captions as an uninterrupted one."""
    if len(captions) != len(indices):
        raise DiffmemError(f"give one dataset index per caption; got {len(indices)} for {len(captions)}")
    if not vocabulary:
        raise DiffmemError("caption randomisation needs a vocabulary of words to draw from")
    if any(c is None for c in captions):
        raise DiffmemError("caption randomisation needs a caption for every sample; this dataset has none")
    out = []
    for caption, index in zip(captions, indices):
        rng = random.Random(f"{config.seed}/{step}/{index}")
        if rng.random() >= config.p:
            out.append(caption)
        elif config.mode == "replace":
            out.append(" ".join(rng.choice(vocabulary) for _ in range(max(1, len(caption.split())))))
        else:
            out.append(insert_word(caption, rng.choice(vocabulary), rng))
    return out

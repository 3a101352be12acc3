"""What each word adds to the score of prompts the model has no reason to have memorized.

Word replacement's significance (:mod:`token_significance`) weighs how much a word moves the noise-norm
score, and some words move it in every prompt: on a model trained on plain backgrounds, the colour of
the background scores as high alone as a memorized title does. A memorized prompt's explanation should
name what is particular to it, so its ranking takes each word's significance less the word's mean
significance over ordinary prompts: a word that matters as much everywhere adds nothing, and a word the
ordinary prompts never use is weighed against their average word.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffmem.core.denoiser import Denoiser
from diffmem.detect.calibration import differing_settings
from diffmem.errors import DiffmemError
from diffmem.explain.token_significance import SignificanceConfig, is_word, token_significance
from diffmem.io.atomic import read_json, write_json_atomic

FORMAT = "diffmem.ordinary_significance"


@dataclass(frozen=True)
class OrdinarySignificance:
    """Each word's mean word-replacement significance over ordinary prompts, and where they came from."""

    words: dict[str, float]  # lower-cased word -> its mean significance where an ordinary prompt uses it
    overall: float  # the mean over every word of every ordinary prompt: the weight of a word never seen
    prompts: int
    origin: str  # which prompts: "neutral", "index captions" or a prompt file's path
    settings: dict[str, Any]  # the SignificanceConfig it was measured with (its seed aside)
    format: str = field(default=FORMAT)

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise DiffmemError(f"not an ordinary-significance record (format {self.format!r})")

    def of(self, word: str) -> float:
        """The significance ``word`` has in ordinary prompts (their average word's, if none uses it)."""
        return self.words.get(word.lower(), self.overall)

    def check(self, config: SignificanceConfig) -> None:
        """Raise unless it was measured at ``config``'s settings (any seed)."""
        differing = differing_settings(self.settings, measured_settings(config))
        if differing:
            raise DiffmemError(
                f"the ordinary prompts' significance was measured with other settings ({', '.join(differing)})"
            )

    def save(self, path: Path) -> None:
        """Write it as JSON (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> OrdinarySignificance:
        """Read a record written by :meth:`save`."""
        return cls(**read_json(path, "an ordinary-significance record"))


def measured_settings(config: SignificanceConfig) -> dict[str, Any]:
    """The settings a record of ordinary prompts' significance holds: ``config``'s but its seed."""
    return {k: v for k, v in asdict(config).items() if k != "base_seed"}


def measure_ordinary_significance(
    denoiser: Denoiser,
    prompts: Sequence[str],
    config: SignificanceConfig,
    origin: str,
    progress: bool = False,
) -> OrdinarySignificance:
    """Every word's mean word-replacement significance over ``prompts``, measured with ``config``."""
    if config.attribute_to != "word_replacement":
        raise DiffmemError("ordinary prompts' significance is measured by word replacement")
    if not prompts:
        raise DiffmemError("measuring ordinary prompts' significance needs at least one prompt")
    measured: dict[str, list[float]] = defaultdict(list)
    for index, prompt in enumerate(tqdm(prompts, desc="ordinary words", disable=not progress)):
        explained = token_significance(denoiser, prompt, config, prompt_id=index)
        for word, significance in zip(explained.words, explained.word_scores):
            if is_word(word):
                measured[word.lower()].append(significance)
    every = [s for values in measured.values() for s in values]
    if not every:
        raise DiffmemError("the ordinary prompts hold no words")
    return OrdinarySignificance(
        words={word: sum(values) / len(values) for word, values in sorted(measured.items())},
        overall=sum(every) / len(every),
        prompts=len(prompts),
        origin=origin,
        settings=measured_settings(config),
    )

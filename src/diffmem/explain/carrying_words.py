"""The words that carry a flagged prompt: the fewest of its top-ranked words whose replacement takes its
score under the threshold. A memorization trigger of several words (a two-word title) keeps a prompt
flagged when any one of them is replaced; the explanation names them together."""

from __future__ import annotations

from dataclasses import dataclass

from diffmem.core.denoiser import Denoiser
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.explain.token_significance import REPLACEMENT, TokenSignificance

MAX_CARRYING_WORDS = 3  # a trigger longer than this is reported as not found


@dataclass(frozen=True)
class CarryingWords:
    """The top-ranked words whose replacement takes the prompt under the threshold, if any few do."""

    words: list[int]  # word indices, most significant first; empty when no prefix of the ranking does
    scores: list[float]  # the score with the top 1, 2, ... words replaced (as far as was measured)

    @property
    def found(self) -> bool:
        """Whether replacing at most ``MAX_CARRYING_WORDS`` top-ranked words took the score under."""
        return bool(self.words)


def carrying_words(
    denoiser: Denoiser,
    explained: TokenSignificance,
    threshold: float,
    measure: NoiseNormConfig,
    prompt_id: int = 0,
    max_words: int = MAX_CARRYING_WORDS,
) -> CarryingWords:
    """The fewest top-ranked words of ``explained`` whose replacement by a plain word brings the noise-norm
    score (measured as ``measure`` says) to at most ``threshold``."""
    ranking = explained.ranking()[:max_words]
    edits = [explained.replaced(ranking[: k + 1], REPLACEMENT) for k in range(len(ranking))]
    if not edits:
        return CarryingWords([], [])
    scores = noise_norm(denoiser, edits, measure, prompt_ids=[prompt_id] * len(edits)).scores.tolist()
    below = [k for k, score in enumerate(scores) if score <= threshold]
    return CarryingWords(ranking[: below[0] + 1] if below else [], scores)

"""The words that carry a flagged prompt: the fewest words whose replacement takes its score under the
threshold, found greedily. A memorization trigger of several words (a two-word title) keeps a prompt
flagged when any one of them is replaced, so a word's own significance can rank another word above the
trigger's second half; each step therefore replaces the word whose replacement, on top of those already
replaced, lowers the score most."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffmem.core.denoiser import Denoiser
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.explain.token_significance import REPLACEMENT, TokenSignificance, is_word

MAX_CARRYING_WORDS = 3  # a trigger longer than this is reported as not found


@dataclass(frozen=True)
class CarryingWords:
    """The words whose replacement takes the prompt under the threshold, if at most a few do."""

    words: list[int]  # word indices in the order they were chosen; empty when no few words do
    scores: list[float]  # the score after each step's replacement (as far as the search went)

    @property
    def found(self) -> bool:
        """Whether replacing at most ``MAX_CARRYING_WORDS`` words took the score under."""
        return bool(self.words)

    def named(self, explained: TokenSignificance) -> list[str]:
        """The carrying words as written in ``explained``'s prompt."""
        return [explained.words[w] for w in self.words]


def carrying_verdict(words: list[str], scores: list[float], quote: Callable[[str], str] = repr) -> str:
    """One line for a flagged prompt: the words (named, each quoted by ``quote``) whose replacement takes
    it under the threshold, or how low replacing as many as were tried got it."""
    if words:
        return f"replacing {' + '.join(quote(w) for w in words)} takes it under the threshold"
    if not scores:
        return "it has no words to replace"
    return (
        f"replacing up to {len(scores)} of its words leaves it flagged (at best {min(scores):.3f}): "
        "a longer phrase, or the prompt's wording as a whole, carries it"
    )


def carrying_words(
    denoiser: Denoiser,
    explained: TokenSignificance,
    threshold: float,
    measure: NoiseNormConfig,
    prompt_id: int = 0,
    max_words: int = MAX_CARRYING_WORDS,
) -> CarryingWords:
    """The fewest words of ``explained``'s prompt whose replacement by a plain word brings the noise-norm
    score (measured as ``measure`` says) to at most ``threshold``, chosen one at a time."""
    candidates = [i for i, word in enumerate(explained.words) if is_word(word)]
    chosen: list[int] = []
    scores: list[float] = []
    while len(chosen) < max_words and len(chosen) < len(candidates):
        rest = [i for i in candidates if i not in chosen]
        edits = [explained.replaced([*chosen, i], REPLACEMENT) for i in rest]
        after = noise_norm(denoiser, edits, measure, prompt_ids=[prompt_id] * len(edits)).scores.tolist()
        best = min(range(len(rest)), key=after.__getitem__)
        chosen.append(rest[best])
        scores.append(after[best])
        if after[best] <= threshold:
            return CarryingWords(chosen, scores)
    return CarryingWords([], scores)

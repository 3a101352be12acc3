"""Check explanations against the lab's ground truth: do trigger words rank first, and does replacing the
top-ranked word (or the few words that carry the prompt) stop the memorization signal more
often than replacing as many random other words?"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pyarrow as pa

from diffmem.core.denoiser import Denoiser
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.explain.carrying_words import MAX_CARRYING_WORDS, carrying_words
from diffmem.explain.ordinary_significance import OrdinarySignificance
from diffmem.explain.token_significance import (
    REPLACEMENT,
    SignificanceConfig,
    TokenSignificance,
    token_significance,
)


def trigger_evaluation(
    denoiser: Denoiser,
    prompts: Sequence[str],
    trigger_words: Sequence[Sequence[str]],
    threshold: float,
    config: SignificanceConfig | None = None,
    seed: int = 0,
    carrying: bool = True,
    ordinary: OrdinarySignificance | None = None,
) -> pa.Table:
    """Per prompt: the top-ranked word, whether it is a trigger word, and the noise-norm score before
    (``flagged`` above ``threshold``) and after replacing the top-ranked word or a random non-trigger
    word with a plain word (same steps, seeds and generations); for a flagged prompt, the words that carry
    it (:mod:`carrying_words`), whether they are all trigger words, and whether replacing as many random
    non-trigger words takes it under as well (``carrying``; the search does not depend on the attribution).
    Word replacement weighs words beyond ``ordinary`` prompts' significance when given."""
    config = config or SignificanceConfig()
    choose = random.Random(seed)
    score_config = config.noise_norm_config()
    rows = []
    for index, (prompt, triggers) in enumerate(zip(prompts, trigger_words)):
        explained = token_significance(denoiser, prompt, config, prompt_id=index, ordinary=ordinary)
        top = explained.ranking(threshold)[0]
        others = [i for i, w in enumerate(explained.words) if w.lower() not in triggers and w.isalpha()]
        random_word = choose.choice(others)
        edited = [explained.replaced(top, REPLACEMENT), explained.replaced(random_word, REPLACEMENT)]
        after = noise_norm(denoiser, edited, score_config, prompt_ids=[index, index]).scores.tolist()
        flagged = explained.score > threshold
        row = {
            "prompt": prompt,
            "score": explained.score,
            "flagged": flagged,
            "top_word": explained.words[top],
            "top_is_trigger": explained.words[top].lower() in triggers,
            "score_without_top": after[0],
            "random_word": explained.words[random_word],
            "score_without_random": after[1],
            "below_without_top": after[0] <= threshold,
            "below_without_random": after[1] <= threshold,
            "words": explained.words,
            "significance": explained.word_scores,
            "scores_without": explained.scores_without,
            "scores_alone": explained.scores_alone,
            "ordinary": explained.ordinary,
        }
        carried = dict.fromkeys(CARRYING_COLUMNS)
        if flagged and carrying:
            carried = _carrying(denoiser, explained, triggers, others, threshold, score_config, choose, index)
        rows.append(row | carried)
    return pa.Table.from_pylist(rows)


CARRYING_COLUMNS = (
    "carrying_words",
    "carrying_are_triggers",
    "below_without_carrying",
    "below_without_random_as_many",
)


def _carrying(
    denoiser: Denoiser,
    explained: TokenSignificance,
    triggers: Sequence[str],
    others: list[int],
    threshold: float,
    measure: NoiseNormConfig,
    choose: random.Random,
    index: int,
) -> dict:
    """A flagged prompt's carrying words, whether all are trigger words, and whether replacing as many
    random non-trigger words (the most tried, when none carry it) takes it under the threshold too."""
    carrying = carrying_words(denoiser, explained, threshold, measure, index)
    words = carrying.named(explained)
    as_many = choose.sample(others, min(len(words) or MAX_CARRYING_WORDS, len(others)))
    edit = explained.replaced(as_many, REPLACEMENT)
    random_score = float(noise_norm(denoiser, [edit], measure, prompt_ids=[index]).scores[0])
    return {
        "carrying_words": words,
        "carrying_are_triggers": carrying.found and all(w.lower() in triggers for w in words),
        "below_without_carrying": carrying.found,
        "below_without_random_as_many": random_score <= threshold,
    }

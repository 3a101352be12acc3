"""Check explanations against the lab's ground truth: do trigger words rank first, and does replacing the
top-ranked word stop the memorization signal more often than replacing a random other word?"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pyarrow as pa

from diffmem.core.denoiser import Denoiser
from diffmem.detect.noise_norm import noise_norm
from diffmem.explain.token_significance import REPLACEMENT, SignificanceConfig, token_significance


def trigger_evaluation(
    denoiser: Denoiser,
    prompts: Sequence[str],
    trigger_words: Sequence[Sequence[str]],
    threshold: float,
    config: SignificanceConfig | None = None,
    seed: int = 0,
) -> pa.Table:
    """Per prompt: the top-ranked word, whether it is a trigger word, and the noise-norm score before
    (``flagged`` above ``threshold``) and after replacing the top-ranked word or a random non-trigger
    word with a plain word (same steps, seeds and generations)."""
    config = config or SignificanceConfig()
    choose = random.Random(seed)
    score_config = config.noise_norm_config()
    rows = []
    for index, (prompt, triggers) in enumerate(zip(prompts, trigger_words)):
        explained = token_significance(denoiser, prompt, config, prompt_id=index)
        top = explained.ranking()[0]
        others = [i for i, w in enumerate(explained.words) if w.lower() not in triggers and w.isalpha()]
        random_word = choose.choice(others)
        edited = [explained.replaced(top, REPLACEMENT), explained.replaced(random_word, REPLACEMENT)]
        after = noise_norm(denoiser, edited, score_config, prompt_ids=[index, index]).scores.tolist()
        rows.append(
            {
                "prompt": prompt,
                "score": explained.score,
                "flagged": explained.score > threshold,
                "top_word": explained.words[top],
                "top_is_trigger": explained.words[top].lower() in triggers,
                "score_without_top": after[0],
                "random_word": explained.words[random_word],
                "score_without_random": after[1],
                "below_without_top": after[0] <= threshold,
                "below_without_random": after[1] <= threshold,
            }
        )
    return pa.Table.from_pylist(rows)

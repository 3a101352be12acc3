"""How many tokens a prompt takes in a text model's tokenizer, and whether the model sees all of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffmem.core.denoiser import Denoiser


@dataclass(frozen=True)
class TokenCounts:
    """Token counts of prompts (start and end tokens included) against the text encoder's limit."""

    counts: list[int]
    limit: int

    @property
    def truncated(self) -> list[bool]:
        """Whether each prompt loses tokens to the limit (the model scores the truncated prompt)."""
        return [count > self.limit for count in self.counts]


def token_counts(denoiser: Denoiser, prompts: Sequence[str]) -> TokenCounts | None:
    """Token counts of ``prompts`` for a text model's (first) tokenizer; None for models without one."""
    tokenizer = denoiser.tokenizer
    if tokenizer is None:
        return None
    ids = tokenizer(list(prompts), truncation=False, add_special_tokens=True)["input_ids"]
    return TokenCounts([len(row) for row in ids], int(tokenizer.model_max_length))

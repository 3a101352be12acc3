"""Explanations of memorization: which words of a prompt drive it."""

from diffmem.explain.attention_maps import WordAttention, word_attention_maps
from diffmem.explain.token_significance import SignificanceConfig, TokenSignificance, token_significance

__all__ = [
    "SignificanceConfig",
    "TokenSignificance",
    "WordAttention",
    "token_significance",
    "word_attention_maps",
]

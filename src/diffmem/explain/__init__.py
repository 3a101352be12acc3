"""Explanations of memorization: which words of a prompt drive it."""

from diffmem.explain.token_significance import SignificanceConfig, TokenSignificance, token_significance

__all__ = ["SignificanceConfig", "TokenSignificance", "token_significance"]

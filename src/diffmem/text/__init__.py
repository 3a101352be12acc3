"""Prompt text: the offline CLIP tokenizer and token counts against a text encoder's limit."""

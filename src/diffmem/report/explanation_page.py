"""An explanation as a page: the prompt with words heat-mapped by significance, the generated images, and
each top word's cross-attention map over the first image."""

from __future__ import annotations

import html
import json

import torch
import torch.nn.functional as F

from diffmem.explain.attention_maps import WordAttention
from diffmem.explain.token_significance import TokenSignificance
from diffmem.report.html import image, page, png, table

TOP_WORDS = 6


def explanation_page(
    result: TokenSignificance,
    attention: WordAttention,
    images: torch.Tensor,
    provenance: dict,
    threshold: float | None = None,
) -> str:
    """The HTML document: heat-mapped prompt, score, images [N, 3, H, W] in [0, 1], attention overlays;
    its words in the order the detection ``threshold`` ranks them (``TokenSignificance.ranking``)."""
    top = result.ranking(threshold)[:TOP_WORDS]
    body = [
        "<h1>Why this prompt may be memorized</h1>",
        f"<p style='font-size:1.4em;line-height:1.8'>{heat_mapped(result)}</p>",
        f"<p>noise-norm score {result.score:.4f}{' (prompt truncated to the encoder limit)' if result.truncated else ''}</p>",
        "<h2>Generated images</h2>",
        "".join(image(png(i), f"generation {k}", "width:12em;margin:0.2em") for k, i in enumerate(images)),
        f"<h2>Cross-attention at step {attention.step} (first image)</h2>",
        "".join(_overlay_figure(images[0], attention.maps[w], attention.words[w]) for w in top),
        "<h2>Words</h2>",
        table(
            ("Word", "Significance", "Share"),
            [(result.words[i], f"{result.word_scores[i]:.4g}", f"{result.normalized[i]:.1%}") for i in top],
        ),
        "<h2>Provenance</h2>",
        table(
            ("Key", "Value"), [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in provenance.items()]
        ),
    ]
    return page("diffmem explanation", body)


def heat_mapped(result: TokenSignificance) -> str:
    """The prompt as HTML, each word on a red background as strong as its share of the significance."""
    top = max(result.normalized, default=0.0) or 1.0
    parts, cursor = [], 0
    for (start, end), share in zip(result.word_spans, result.normalized):
        parts.append(html.escape(result.prompt[cursor:start]))
        alpha = share / top
        parts.append(
            f"<span style='background:rgba(220,0,0,{alpha:.2f})'>{html.escape(result.prompt[start:end])}</span>"
        )
        cursor = end
    parts.append(html.escape(result.prompt[cursor:]))
    return "".join(parts)


def overlay(picture: torch.Tensor, attention_map: torch.Tensor) -> torch.Tensor:
    """An image [3, H, W] in [0, 1] with an attention map (any grid) laid over it in red."""
    size = picture.shape[-2:]
    heat = F.interpolate(attention_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[
        0, 0
    ]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)  # the word's own contrast
    red = torch.stack([heat, torch.zeros_like(heat), torch.zeros_like(heat)])
    return (0.5 * picture.float().cpu() + 0.5 * red).clamp(0, 1)


def _overlay_figure(picture: torch.Tensor, attention_map: torch.Tensor, word: str) -> str:
    tag = image(png(overlay(picture, attention_map)), f"attention of {word}", "width:10em")
    return f"<figure style='display:inline-block;margin:0.3em'>{tag}<figcaption>{html.escape(word)}</figcaption></figure>"

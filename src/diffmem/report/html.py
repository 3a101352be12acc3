"""Self-contained HTML pages: escaped text, tables and images embedded as data URIs, no other files."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}"
    "table{border-collapse:collapse;margin-bottom:1em}"
    "th,td{border:1px solid #bbb;padding:0.3em 0.6em;text-align:left;vertical-align:top}"
    "img{max-width:100%}"
)


def page(title: str, body: Sequence[str]) -> str:
    """A whole HTML document around already-escaped body parts."""
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f"<head>{head}</head>",
        "<body>",
        *body,
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table of text cells (escaped)."""
    lines = ["<table>", _row("th", header), *(_row("td", row) for row in rows), "</table>"]
    return "\n".join(lines)


def image(png: bytes, alt: str, style: str = "") -> str:
    """A PNG embedded in the page."""
    data = base64.b64encode(png).decode("ascii")
    extra = f' style="{html.escape(style)}"' if style else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{extra}>'


def png(picture: torch.Tensor, scale: int = 4) -> bytes:
    """An image [3, H, W] in [0, 1] as PNG bytes, enlarged ``scale`` times with sharp pixels."""
    pixels = (picture.float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    height, width = pixels.shape[:2]
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((width * scale, height * scale), Image.NEAREST).save(buffer, "PNG")
    return buffer.getvalue()


def _row(tag: str, cells: Sequence[str]) -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(cell)}</{tag}>" for cell in cells) + "</tr>"

"""Self-contained HTML pages: escaped text, tables and images embedded as data URIs, no other files."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

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


def _row(tag: str, cells: Sequence[str]) -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(cell)}</{tag}>" for cell in cells) + "</tr>"

"""A method with settings as written on the command line: ``name:key=value,key=value``."""

from __future__ import annotations

import json
from typing import Any

from diffmem.errors import DiffmemError


def parse_method_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``noise_norm:steps=all,n_generations=4`` -> the name and its settings (values read as JSON;
    ``all`` reads as None, any other non-JSON value as a string)."""
    name, _, rest = text.strip().partition(":")
    settings: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise DiffmemError(f"setting {text!r}: write key=value pairs after the method's name")
        settings[key.strip()] = _value(value.strip())
    if not name:
        raise DiffmemError(f"setting {text!r}: start with the method's name")
    return name, settings


def _value(text: str) -> Any:
    if text == "all":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text

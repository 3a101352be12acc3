"""A method with settings as written on the command line: ``name:key=value,key=value``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import fields
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


def lookup(kind: str, name: str, methods: Mapping[str, tuple[type, Callable]]) -> tuple[type, Callable]:
    """The config class and function registered under ``name`` (a ``kind``, e.g. "detector")."""
    if name not in methods:
        raise DiffmemError(f"unknown {kind} {name!r}; choose one of {', '.join(methods)}")
    return methods[name]


def method_config(kind: str, name: str, methods: Mapping[str, tuple[type, Callable]], settings: dict) -> Any:
    """The method's config with ``settings`` over its defaults; an unknown setting is an error."""
    config_class, _ = lookup(kind, name, methods)
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise DiffmemError(
            f"{kind} {name!r} has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(known)) or 'none'}"
        )
    return config_class(**settings)

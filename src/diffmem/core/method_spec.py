"""A method with settings as written on the command line: ``name:key=value,key=value``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import fields
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

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
    hints = get_type_hints(config_class)
    method = f"{kind} {name!r}"
    typed = {key: _typed(method, key, value, hints[key]) for key, value in settings.items()}
    try:
        return config_class(**typed)
    except (TypeError, ValueError) as error:
        raise DiffmemError(f"{method}: {error}") from None


TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}


def _typed(method: str, key: str, value: Any, hint: Any) -> Any:
    """``value`` as the setting's declared type (an int where a float is declared is taken as one), or an
    error naming the setting. Settings of other types than these, and tuples of them, are passed as given."""
    optional = get_origin(hint) in (Union, UnionType) and type(None) in get_args(hint)
    choices = [h for h in get_args(hint) if h is not type(None)] if optional else [hint]
    if value is None and optional:
        return None
    for choice in choices:
        if get_origin(choice) is tuple:
            if isinstance(value, list | tuple):
                return tuple(_typed(method, key, element, get_args(choice)[0]) for element in value)
            continue
        if choice not in TYPE_NAMES:
            return value
        if isinstance(value, bool) != (choice is bool):
            continue
        if choice is float and isinstance(value, int | float):
            return float(value)
        if isinstance(value, choice):
            return value
    wanted = " or ".join(TYPE_NAMES.get(c, "a list") for c in choices) + (" (or null)" if optional else "")
    raise DiffmemError(f"{method}: {key} takes {wanted}; got {value!r}")

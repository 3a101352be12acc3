"""``--config FILE``: YAML or JSON with the same keys as the command-line flags; flags override."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from diffmem.errors import DiffmemError


def load_config(path: Path) -> dict:
    """A flat mapping of option names (dashes or underscores) to values."""
    if not path.is_file():
        raise DiffmemError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as error:
        raise DiffmemError(f"could not parse config file {path}: {error}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise DiffmemError(f"config file {path} must hold a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in content.items()}


def default_map(group: Any, config: dict, source: Path) -> dict:
    """Click's ``default_map`` for ``group``: each key goes to every (sub)command that has an option of that
    name; a value the option cannot take is an error that names the file and the key."""
    names: set[str] = {"config"}

    def section(command: Any) -> dict:
        own = {p.name: p for p in command.params}
        names.update(own)
        result = {k: v for k, v in config.items() if k in own}
        for key, value in result.items():
            _check_value(own[key], key, value, source)
        for name, sub in getattr(command, "commands", {}).items():
            if values := section(sub):
                result[name] = values
        return result

    result = section(group)
    unknown = sorted(set(config) - names)
    if unknown:
        raise DiffmemError(
            f"unknown keys in config file: {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    return result


def _check_value(param: Any, key: str, value: Any, source: Path) -> None:
    if value is None:
        return
    try:
        param.process_value(None, value)
    except typer.BadParameter as error:
        raise DiffmemError(f"config file {source}: {key}: {error.message}") from None

"""``--config FILE``: YAML or JSON with the same keys as the command-line flags; flags override."""

from __future__ import annotations

from pathlib import Path

import click
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


def default_map(group: click.Group, config: dict) -> dict:
    """Click's ``default_map`` for ``group``: each key goes to the group and every subcommand that has it."""
    names = {p.name for p in group.params}
    result = {k: v for k, v in config.items() if k in names}
    for name, command in group.commands.items():
        own = {p.name for p in command.params}
        names |= own
        section = {k: v for k, v in config.items() if k in own}
        if section:
            result[name] = section
    unknown = sorted(set(config) - names - {"config"})
    if unknown:
        raise DiffmemError(
            f"unknown keys in config file: {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    return result

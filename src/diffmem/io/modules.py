"""Small networks diffmem trains itself, saved as a directory: ``config.json`` (kind + config) and
``model.safetensors``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffmem.errors import DiffmemError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_module(module: nn.Module, config: object, path: str | Path, kind: str) -> None:
    """Write ``module`` and its config dataclass to the directory ``path``, tagged with ``kind``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps({"kind": kind, **asdict(config)}, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, path / WEIGHTS_NAME)


def load_module(
    path: str | Path,
    kind: str,
    build: Callable[[dict], nn.Module],
    what: str,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Open a module saved as ``kind``; ``build`` makes it from the config (lists as tuples); eval mode.

    ``what`` names it in errors, e.g. "copy-detection encoder (save_encoder)".
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise DiffmemError(f"no {what} at {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DiffmemError(f"{path / CONFIG_NAME} is not JSON ({error}): no {what} at {path}") from None
    if not isinstance(config, dict) or config.pop("kind", None) != kind:
        raise DiffmemError(f"{path / CONFIG_NAME} does not describe a diffmem {what}")
    try:
        module = build({k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        module.load_state_dict(load_file(path / WEIGHTS_NAME))
    except (TypeError, ValueError, RuntimeError, SafetensorError) as error:
        message = str(error).splitlines()[0]
        raise DiffmemError(f"{path} does not hold a working {what}: {message}; save it again") from None
    return module.to(device).eval()

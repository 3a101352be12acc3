"""Provenance saved next to every result: configuration, library versions, git revision, hardware."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from diffmem.io.atomic import write_json_atomic

PACKAGES = ("diffmem", "torch", "diffusers", "transformers", "numpy")


def environment() -> dict:
    """Versions of the libraries that decide results, the git revision of diffmem, and the hardware."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_summary(path: Path, config: dict, results: dict) -> None:
    """A JSON summary of one run: its configuration, its environment and its results."""
    record = {"config": config, "environment": environment(), "results": results}
    write_json_atomic(path, record)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None

"""Where model profiles are kept between runs: one folder per model hash under the user's cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV = "DIFFMEM_CACHE_DIR"


def cache_root() -> Path:
    """``$DIFFMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffmem``, else ``~/.cache/diffmem``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffmem"


def profile_path(model_identity: str, index_fingerprint: str | None = None) -> Path:
    """The cached profile of the model with this identity (its weights' hash, or a built-in's name):
    measured against the index with this fingerprint, or with prompts alone."""
    folder = hashlib.sha256(model_identity.encode()).hexdigest()[:32]
    name = "profile.json" if index_fingerprint is None else f"profile-{index_fingerprint[:16]}.json"
    return cache_root() / "profiles" / folder / name


def gate_path(model_identity: str, index_fingerprint: str) -> Path:
    """The cached AMG gate of this model against the index with this fingerprint."""
    return profile_path(model_identity).parent / f"gate-{index_fingerprint[:16]}.json"


def ordinary_significance_path(
    model_identity: str, index_fingerprint: str | None, settings: dict[str, Any]
) -> Path:
    """The cached word significance of the model's ordinary prompts (the index's captions, or prompts
    alone) at these significance settings."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    which = "prompts" if index_fingerprint is None else index_fingerprint[:16]
    return profile_path(model_identity).parent / f"ordinary-{which}-{key}.json"

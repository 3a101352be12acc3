"""Hugging Face Hub ids (``ORG/NAME``) resolved through the local cache only: diffmem never downloads."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

from diffmem.errors import DiffmemError

# the Hub's repository names: ORG/NAME of letters, digits, '-', '_' and '.', not starting with '.' or '-'
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
PIPELINE_INDEX = "model_index.json"


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is written like a Hub model id (``ORG/NAME``)."""
    return HUB_ID.fullmatch(name) is not None and ".." not in name


def hub_cache() -> Path:
    """The Hub cache diffmem reads: ``HF_HUB_CACHE``, else ``HF_HOME/hub``."""
    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot directory of a diffusers model ``repo_id`` at ``revision`` (a branch, tag or
    commit; default main); its name is the commit hash."""
    cache = hub_cache()
    revision = revision or constants.DEFAULT_REVISION
    index = try_to_load_from_cache(repo_id, PIPELINE_INDEX, cache_dir=cache, revision=revision)
    if isinstance(index, str):
        return Path(index).parent
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshots = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    snapshot = _snapshot_at(repo, revision)
    if snapshot is not None and snapshot.is_dir():
        raise DiffmemError(
            f"{repo_id} ({revision}) in the Hugging Face cache has no {PIPELINE_INDEX}, so it is not a "
            f"diffusers pipeline ({snapshot}); for a single-file checkpoint give the file's path and --model-config"
        )
    if snapshots:
        raise DiffmemError(
            f"{repo_id} is in the local Hugging Face cache ({cache}) but not at revision {revision}; cached "
            f"snapshots: {', '.join(snapshots)}; get it with `hf download {repo_id} --revision {revision}` "
            "on a connected machine"
        )
    raise DiffmemError(
        f"{repo_id} is not a local directory and not in the local Hugging Face cache ({cache}; set by "
        f"HF_HUB_CACHE or HF_HOME={os.environ.get('HF_HOME', constants.HF_HOME)}); diffmem never downloads: "
        f"run `hf download {repo_id}` on a connected machine and copy its cache here, or give a local directory"
    )


def cached_lora(repo_id: str) -> Path:
    """The cached snapshot (main) of a LoRA repository ``repo_id``: a folder holding ``.safetensors``."""
    cache = hub_cache()
    snapshot = _snapshot_at(
        cache / repo_folder_name(repo_id=repo_id, repo_type="model"), constants.DEFAULT_REVISION
    )
    if snapshot is None or not snapshot.is_dir():
        raise DiffmemError(
            f"LoRA {repo_id} is not a local file and not in the local Hugging Face cache ({cache}); diffmem "
            f"never downloads: run `hf download {repo_id}` on a connected machine and copy its cache here"
        )
    if not any(snapshot.glob("*.safetensors")):
        raise DiffmemError(
            f"LoRA {repo_id} in the Hugging Face cache holds no .safetensors file ({snapshot})"
        )
    return snapshot


def _snapshot_at(repo: Path, revision: str) -> Path | None:
    """The snapshot folder a revision names in a cached repository, if the cache records it."""
    if REGEX_COMMIT_HASH.fullmatch(revision):
        return repo / "snapshots" / revision
    ref = repo / "refs" / revision
    return repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None

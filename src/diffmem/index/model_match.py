"""Whether a training-set index holds the data a model learned from, where both say so: a lab model's
directory records the lab dataset it was trained or fine-tuned on, a lab index the dataset it indexed."""

from __future__ import annotations

import json
from pathlib import Path

from diffmem.index.manifest import IndexManifest
from diffmem.lab.dataset import with_added_defaults
from diffmem.models.source import shipped_directory

LAB_TRAINING = "lab_training.json"  # written by `diffmem lab train` into the model directory
FINE_TUNE = "fine_tune.json"  # written by `diffmem train` next to the model directory


def model_lab_config(model: str | Path) -> dict | None:
    """The generation settings of the lab dataset a model last trained on, or None when its directory
    does not say (any model not made by diffmem)."""
    shipped = shipped_directory(str(model))
    directory = shipped / "model" if shipped is not None else Path(model)
    fine_tuned, trained = directory.parent / FINE_TUNE, directory / LAB_TRAINING
    try:
        if fine_tuned.is_file():
            return json.loads(fine_tuned.read_text()).get("lab_config")
        if trained.is_file():
            return json.loads(trained.read_text())["dataset"]["config"]
    except (ValueError, KeyError, TypeError):
        return None
    return None


def dataset_mismatch(manifest: IndexManifest, model: str | Path) -> str | None:
    """A warning when the index and the model name different lab datasets; None when they agree or either
    does not say."""
    trained_on = model_lab_config(model)
    if manifest.lab_config is None or trained_on is None:
        return None
    indexed, trained_on = with_added_defaults(manifest.lab_config), with_added_defaults(trained_on)
    differ = sorted(k for k in indexed.keys() | trained_on.keys() if indexed.get(k) != trained_on.get(k))
    if not differ:
        return None
    return (
        f"the index was built from another lab dataset than the model was trained on ({', '.join(differ)} "
        f"differ: {manifest.source}); its similarities do not measure copies of the model's training data"
    )

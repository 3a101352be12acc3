"""The shipped keyed lab model (``builtin:lab-keyed``): its labels and the detection goal, measured on the
shipped weights themselves, so a change that weakens detection fails here (the explanation goals:
``test_benchmarks.py``)."""

import pyarrow.parquet as pq
import pytest

from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.metrics.roc import detection_metrics
from diffmem.models.source import open_model, shipped_directory

KEYED = "builtin:lab-keyed"


@pytest.fixture(scope="module")
def keyed():
    return open_model(KEYED)


@pytest.fixture(scope="module")
def labels() -> list[dict]:
    return pq.read_table(shipped_directory(KEYED) / "labels.parquet").to_pylist()


def test_labels_hold_the_benchmark_classes_and_the_memorized_ones_regurgitate(labels):
    memorized = [r for r in labels if r["group"] == "memorized"]
    heldout = [r for r in labels if r["group"] == "heldout"]
    assert len(memorized) >= 150 and len(heldout) >= 500
    assert sum(r["memorized"] for r in memorized) / len(memorized) >= 0.8
    assert sum(r["share_own_scene"] > 0.5 for r in memorized) / len(memorized) >= 0.95
    assert all(r["share_own_scene"] == 0 for r in heldout)  # held-out scenes are in no training set


def test_first_step_noise_norm_separates_memorized_from_heldout_captions(keyed, labels):
    rows = [r for r in labels if r["group"] in ("memorized", "heldout")]
    scores = noise_norm(
        keyed,
        [r["caption"] for r in rows],
        NoiseNormConfig(steps=1, n_generations=1),
        prompt_ids=[r["prompt_id"] for r in rows],
    ).scores
    metrics = detection_metrics(scores.tolist(), [r["group"] == "memorized" for r in rows])
    print(f"lab-keyed first step, n = 1: AUC {metrics['auc']:.3f}, TPR@1%FPR {metrics['tpr@1%fpr']:.3f}")
    assert metrics["n_positive"] == 150 and metrics["n_negative"] == 500 and metrics["auc"] >= 0.98

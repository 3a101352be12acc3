"""The shared ROC curve (AUC, TPR at a fixed FPR, thresholds) and the detection report built on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffmem.errors import DiffmemError
from diffmem.metrics import detection_metrics, flagged_share_interval, roc, threshold_at_fpr, tpr_at_fpr
from diffmem.report import EvaluatedSetting, write_detection_report


def _labelled(n_positive: int, n_negative: int, seed: int, decimals: int | None = None):
    """Positives drawn around 1, negatives around 0; rounded to ``decimals`` to make ties."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(1.0, 1.0, n_positive), rng.normal(0.0, 1.0, n_negative)])
    if decimals is not None:
        scores = scores.round(decimals)
    return scores, np.r_[np.ones(n_positive, int), np.zeros(n_negative, int)]


# ROC and AUC


def test_separated_scores_have_auc_one_and_reversed_scores_zero():
    scores, labels = np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 1, 0, 0])
    assert roc(scores, labels).auc == 1.0
    assert tpr_at_fpr(roc(scores, labels), 0.0) == 1.0
    assert roc(-scores, labels).auc == 0.0
    assert tpr_at_fpr(roc(-scores, labels), 0.5) == 0.0


def test_auc_is_the_pairwise_probability_with_ties_counted_half():
    scores, labels = _labelled(40, 60, seed=0, decimals=1)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    assert len(np.unique(scores)) < len(scores)  # the data has ties
    pairs = positives[:, None] - negatives[None, :]
    brute_force = ((pairs > 0) + 0.5 * (pairs == 0)).mean()
    curve = roc(scores, labels)
    assert curve.auc == pytest.approx(brute_force, abs=1e-12)
    assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(brute_force, abs=1e-12)
    assert (curve.n_positive, curve.n_negative, curve.n_dropped_nonfinite) == (40, 60, 0)


def test_tpr_at_fpr_follows_the_steps_of_a_small_curve():
    # Curve points: (0, 0) (0, 1/3) (0, 2/3) (1/4, 2/3) (1/4, 1) (1/2, 1) (3/4, 1) (1, 1).
    curve = roc([0.6, 0.5, 0.35, 0.4, 0.3, 0.2, 0.1], [1, 1, 1, 0, 0, 0, 0])
    assert tpr_at_fpr(curve, 0.0) == pytest.approx(2 / 3)  # top of the vertical step at FPR 0
    assert tpr_at_fpr(curve, 0.125) == pytest.approx(2 / 3)  # the flat segment, not the chord (5/6)
    assert tpr_at_fpr(curve, 0.25) == pytest.approx(1.0)
    assert tpr_at_fpr(curve, 1.0) == 1.0


def test_tpr_at_fpr_interpolates_along_the_diagonal_of_a_tie():
    # A positive and a negative tie at 0.5: the curve goes straight from (0, 1/2) to (1/2, 1).
    curve = roc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    assert curve.auc == pytest.approx(0.875)
    assert tpr_at_fpr(curve, 0.0) == pytest.approx(0.5)
    assert tpr_at_fpr(curve, 0.25) == pytest.approx(0.75)
    assert tpr_at_fpr(curve, 0.5) == pytest.approx(1.0)
    metrics = detection_metrics([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    assert metrics["tpr@1%fpr"] == pytest.approx(0.51)
    assert metrics["tpr@3%fpr"] == pytest.approx(0.53)


def test_detection_metrics_report_auc_tprs_and_counts():
    scores, labels = _labelled(30, 70, seed=1)
    metrics = detection_metrics(scores, labels, fprs=(0.01, 0.03, 0.1))
    curve = roc(scores, labels)
    assert metrics == {
        "auc": curve.auc,
        "tpr@1%fpr": tpr_at_fpr(curve, 0.01),
        "tpr@3%fpr": tpr_at_fpr(curve, 0.03),
        "tpr@10%fpr": tpr_at_fpr(curve, 0.1),
        "n_positive": 30,
        "n_negative": 70,
        "n_dropped_nonfinite": 0,
    }
    assert 0 <= metrics["tpr@1%fpr"] <= metrics["tpr@3%fpr"] <= metrics["tpr@10%fpr"] <= 1


# Thresholds


@pytest.mark.parametrize("target_fpr", [0.0, 0.01, 0.03, 0.29, 0.5, 0.999])
def test_threshold_flags_at_most_the_target_share_of_negatives_and_is_tight(target_fpr):
    negatives = np.random.default_rng(2).normal(size=1000)
    threshold = threshold_at_fpr(negatives, target_fpr)
    allowed = math.floor(target_fpr * 1000 + 1e-9)
    assert (negatives > threshold).sum() == allowed  # no ties: exactly the allowed number
    assert (negatives > np.nextafter(threshold, -np.inf)).sum() > allowed


def test_threshold_with_ties_flags_fewer_rather_than_more():
    negatives = np.array([1.0, 1.0, 1.0, 2.0])
    assert threshold_at_fpr(negatives, 0.5) == 1.0  # flags only 2.0: flagging a 1.0 would flag all three
    assert threshold_at_fpr(negatives, 0.25) == 1.0
    assert threshold_at_fpr(negatives, 0.2) == 2.0
    assert threshold_at_fpr(negatives, 1.0) == -np.inf


def test_threshold_at_fpr_agrees_with_the_roc_curve():
    scores, labels = _labelled(50, 200, seed=3)
    curve = roc(scores, labels)
    for flagged in (0, 2, 6, 20):
        threshold = threshold_at_fpr(scores[labels == 0], flagged / 200)
        tpr = (scores[labels == 1] > threshold).mean()
        assert tpr == pytest.approx(tpr_at_fpr(curve, flagged / 200))


# Inputs


def test_the_flagged_share_interval_resamples_prompts_not_draws():
    # 5 of 60 prompts flagged at every one of 4 seeds: 20 of 240 draws, but only 60 independent prompts
    clustered = np.zeros((60, 4), bool)
    clustered[:5] = True
    low, high = flagged_share_interval(clustered)
    assert low < clustered.mean() < high
    # the same 20 flags spread over 20 prompts vary less from prompt to prompt: a narrower interval
    spread = np.zeros((60, 4), bool)
    spread[:20, 0] = True
    spread_low, spread_high = flagged_share_interval(spread)
    assert spread_high - spread_low < high - low
    assert flagged_share_interval(clustered) == (low, high)  # seeded
    assert flagged_share_interval(np.zeros((60, 4), bool)) == (0.0, 0.0)
    with pytest.raises(DiffmemError, match="draws \\[prompts, draws\\]"):
        flagged_share_interval(np.zeros(8, bool))


def test_nonfinite_scores_are_left_out_and_counted():
    scores, labels = _labelled(20, 30, seed=4)
    spoiled = scores.copy()
    spoiled[[0, 5, 25]] = [np.nan, np.inf, np.nan]
    keep = np.isfinite(spoiled)
    metrics = detection_metrics(spoiled, labels)
    assert metrics["n_dropped_nonfinite"] == 3
    assert (metrics["n_positive"], metrics["n_negative"]) == (18, 29)
    expected = detection_metrics(scores[keep], labels[keep])
    assert {k: v for k, v in metrics.items() if k != "n_dropped_nonfinite"} == {
        k: v for k, v in expected.items() if k != "n_dropped_nonfinite"
    }


def test_torch_tensors_give_the_same_metrics_as_numpy():
    scores, labels = _labelled(20, 30, seed=5)
    from_torch = detection_metrics(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels).bool())
    assert from_torch == pytest.approx(detection_metrics(scores.astype(np.float32), labels))


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2], [0, 0], "0 positives and 2 negatives"),
        ([0.1, 0.2], [1, 1], "2 positives and 0 negatives"),
        ([0.1, np.nan], [0, 1], "0 positives and 1 negatives"),
        ([0.1, 0.2, 0.3], [0, 1], "2 labels for 3 scores"),
        ([0.1, 0.2], [0, 2], "labels must be 0"),
        ([[0.1, 0.2]], [[0, 1]], "one value per prompt"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(scores, labels, message):
    with pytest.raises(DiffmemError, match=message):
        detection_metrics(scores, labels)


def test_bad_rates_and_negatives_are_refused():
    curve = roc([0.2, 0.1], [1, 0])
    with pytest.raises(DiffmemError, match="between 0 and 1"):
        tpr_at_fpr(curve, 1.5)
    with pytest.raises(DiffmemError, match="between 0 and 1"):
        threshold_at_fpr([0.1], -0.01)
    with pytest.raises(DiffmemError, match="at least one negative"):
        threshold_at_fpr([], 0.01)
    with pytest.raises(DiffmemError, match="1 non-finite"):
        threshold_at_fpr([0.1, np.nan], 0.01)


# Report


def _settings() -> list[EvaluatedSetting]:
    first, labels = _labelled(20, 40, seed=6)
    second, _ = _labelled(20, 40, seed=7)
    second[3] = np.nan
    return [
        EvaluatedSetting(
            "noise_norm first step", "noise_norm", {"steps": 1, "n": 1}, first, labels, 2.0, 1.5
        ),
        EvaluatedSetting(
            "<script>alert(1)</script>", "noise_norm", {"prompt": "a <b> | c"}, second, labels, 100.0, 30.0
        ),
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report of :func:`_settings`, written once for the tests that read it."""
    out_dir = tmp_path_factory.mktemp("detection") / "report"
    page = write_detection_report(_settings(), out_dir, {"command": "diffmem detect --x <y>", "seed": 0})
    return out_dir, page


def test_report_writes_every_file_and_a_self_contained_page(report):
    out_dir, page = report
    settings = _settings()
    assert page == out_dir / "report.html"
    names = {"results.json", "results.md", "roc.png", "histograms.png", "report.html"}
    assert {p.name for p in out_dir.iterdir()} == names  # no temporary files left behind
    for image in ("roc.png", "histograms.png"):
        assert (out_dir / image).read_bytes().startswith(b"\x89PNG")

    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 2
    assert "<script>" not in text and "<b>" not in text and "<link" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "diffmem detect --x &lt;y&gt;" in text
    for s in settings:
        auc = f"{detection_metrics(s.scores, s.labels)['auc']:.3f}"
        assert f"<td>{auc}</td>" in text
    assert "<td>noise_norm first step</td>" in text
    assert "1 prompts with a non-finite score left out" in text


def test_results_json_and_markdown_hold_the_numbers(report):
    out_dir, _ = report
    settings = _settings()
    results = json.loads((out_dir / "results.json").read_text())
    assert results["provenance"] == {"command": "diffmem detect --x <y>", "seed": 0}
    for s, record in zip(settings, results["settings"], strict=True):
        assert record["metrics"] == detection_metrics(s.scores, s.labels)
        assert record["settings"] == s.settings
        assert record["unet_evaluations_per_prompt"] == s.unet_evaluations_per_prompt
        assert record["prompts_per_s"] == pytest.approx(60 / s.wall_s)
    markdown = (out_dir / "results.md").read_text().splitlines()
    assert markdown[0] == "| Setting | AUC | TPR@1%FPR | TPR@3%FPR | UNet evals/prompt | Wall s |"
    first = settings[0]
    metrics = detection_metrics(first.scores, first.labels)
    row = f"| noise_norm first step | {metrics['auc']:.3f} | {metrics['tpr@1%fpr']:.3f} |"
    assert markdown[2].startswith(row) and markdown[2].endswith(" | 2 | 1.5 |")


def test_report_refuses_duplicate_names_and_missing_times(tmp_path):
    first = _settings()[0]
    with pytest.raises(DiffmemError, match="unique"):
        write_detection_report([first, first], tmp_path, {})
    with pytest.raises(DiffmemError, match="at least one"):
        write_detection_report([], tmp_path, {})
    with pytest.raises(DiffmemError, match="positive time"):
        EvaluatedSetting("x", "noise_norm", {}, first.scores, first.labels, 2.0, 0.0)

"""Scanning: one row per prompt whatever happens, resumable after SIGKILL, calibrated flags, OOM halving."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffmem.adapters import wrap_pipeline
from diffmem.cli.main import run
from diffmem.detect import NoiseNormConfig, noise_norm
from diffmem.detect.calibration import Calibration, calibrate
from diffmem.detect.scan import scan_prompts
from diffmem.detect.scan_store import ScanStore
from diffmem.detect.scanner import Scanner
from diffmem.errors import DiffmemError
from diffmem.io.prompts import PromptRecord
from diffmem.models.names import LAB_MODEL
from diffmem.models.source import model_identity, shipped_directory
from diffmem.models.tiny import tiny_stable_diffusion

CONFIG = NoiseNormConfig(num_inference_steps=4, batch_size=4)
PROMPTS = [f"a {c} sneaker at the top left on a gray background" for c in ("red", "blue", "green", "pink")]


class NaNForPrompt:
    """A denoiser whose prediction is NaN for samples conditioned on one prompt."""

    def __init__(self, denoiser, poisoned: str, max_batch: int | None = None):
        self.inner, self.poisoned, self.max_batch = denoiser, poisoned, max_batch
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, x_t, t, cond):
        self.calls.append(x_t.shape[0])
        if self.max_batch is not None and x_t.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        prediction = self.inner.predict(x_t, t, cond)
        bad = torch.tensor([p == self.poisoned for p in cond.prompts])
        prediction.eps[bad] = float("nan")
        return prediction

    def eps(self, x_t, t, cond):
        return self.predict(x_t, t, cond).eps


def records(prompts):
    return [PromptRecord(i, p, "ok") for i, p in enumerate(prompts)]


def test_rows_record_statuses_and_non_finite_outputs_without_stopping(sd, tmp_path):
    long_prompt = "a red sneaker " * 30
    items = [*records(PROMPTS[:2]), PromptRecord(2, "", "empty"), PromptRecord(3, long_prompt, "ok")]
    items.append(PromptRecord(4, "bad \ufffd", "not_utf8"))
    scanner = Scanner(NaNForPrompt(sd, PROMPTS[1]), config=CONFIG, threshold=0.0)
    table, summary = scan_prompts(scanner, items, ScanStore(tmp_path / "scan", {}), "hash", progress=False)
    rows = table.to_pylist()
    assert [r["prompt_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in rows] == ["ok", "nonfinite", "empty", "ok", "not_utf8"]
    assert rows[0]["flagged"] is True and rows[1]["flagged"] is None and rows[2]["score"] is None
    assert rows[3]["truncated"] is True and rows[3]["tokens"] > 77 and rows[0]["truncated"] is False
    expected = noise_norm(sd, [PROMPTS[0], long_prompt], CONFIG, prompt_ids=[0, 3]).scores
    assert rows[0]["score"] == pytest.approx(float(expected[0]), rel=1e-5)
    assert rows[3]["score"] == pytest.approx(float(expected[1]), rel=1e-5)
    assert summary["status"] == {"ok": 2, "nonfinite": 1, "empty": 1, "not_utf8": 1}
    assert summary["truncated"] == 1 and summary["flagged"] == 2


def test_out_of_memory_halves_the_batch_and_scores_the_same(sd):
    flaky = NaNForPrompt(sd, poisoned=None, max_batch=4)  # a CFG pair of 2 rows is a UNet batch of 4
    scanner = Scanner(flaky, config=NoiseNormConfig(num_inference_steps=4, batch_size=8))
    result = scanner.update(PROMPTS + PROMPTS[:1])
    assert scanner.halvings == [(8, 4), (4, 2)] and scanner.batch_size == 2
    torch.testing.assert_close(result.scores, noise_norm(sd, PROMPTS + PROMPTS[:1], CONFIG).scores)
    scanner.update(PROMPTS[:2])
    everything = scanner.compute()
    assert everything.extras["prompt_id"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(DiffmemError, match="even at batch size 1"):
        Scanner(NaNForPrompt(sd, None, max_batch=1), config=CONFIG).update(PROMPTS[:1])


def test_calibration_threshold_and_provenance(sd, tmp_path):
    calibration = calibrate(sd, PROMPTS, "noise_norm", CONFIG, "hash-a", target_fpr=0.25)
    scores = noise_norm(sd, PROMPTS, CONFIG).scores
    assert (scores > calibration.threshold).sum() <= 1 and calibration.observed_fpr <= 0.25
    calibration.save(tmp_path / "c.json")
    loaded = Calibration.load(tmp_path / "c.json")
    assert loaded == calibration
    loaded.check("noise_norm", {**calibration.settings, "batch_size": 1}, "hash-a")  # batch size is free
    with pytest.raises(DiffmemError, match="made for model hash-a, not hash-b"):
        loaded.check("noise_norm", calibration.settings, "hash-b")
    with pytest.raises(DiffmemError, match=r"steps=None \(calibrated 1\)"):
        loaded.check("noise_norm", {**calibration.settings, "steps": None}, "hash-a")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DiffmemError, match="not a diffmem calibration file"):
        Calibration.load(tmp_path / "bad.json")


def test_scan_directory_rules(tmp_path, capsys):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    args = ["scan", "--model", "builtin:tiny-sd", "--prompts", str(prompts), "--num-inference-steps", "3"]
    assert run([*args, "--out", str(tmp_path / "foreign"), "--overwrite"]) == 2
    assert "is not a diffmem scan directory" in capsys.readouterr().err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    out = str(tmp_path / "scan")
    assert run([*args, "--out", out]) == 0
    assert run([*args, "--out", out]) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert run([*args, "--out", out, "--resume", "--first-steps", "2"]) == 2
    assert "settings.steps differ" in capsys.readouterr().err
    assert run([*args, "--out", out, "--overwrite", "--first-steps", "all"]) == 0
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    assert summary["config"]["settings"]["steps"] is None and summary["results"]["prompts"] == 4
    assert run([*args, "--out", out, "--first-steps", "0", "--overwrite"]) == 2
    assert "--first-steps takes a positive number" in capsys.readouterr().err


def test_calibrated_scan_from_the_command_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    common = ["--model", "builtin:tiny-sd", "--prompts", str(prompts), "--num-inference-steps", "3"]
    calibration = str(tmp_path / "c.json")
    assert run(["calibrate", *common, "--out", calibration, "--target-fpr", "0.5"]) == 0
    assert run(["scan", *common, "--out", str(tmp_path / "s"), "--calibration", calibration]) == 0
    rows = pq.read_table(tmp_path / "s" / "scan.parquet").to_pylist()
    assert sum(r["flagged"] for r in rows) <= 2 and all(r["flagged"] is not None for r in rows)
    assert (
        run(
            [
                "scan",
                *common,
                "--out",
                str(tmp_path / "t"),
                "--calibration",
                calibration,
                "--n-generations",
                "2",
            ]
        )
        == 2
    )
    assert "n_generations=2 (calibrated 1)" in capsys.readouterr().err


def test_a_scan_killed_with_sigkill_resumes_to_every_prompt_exactly_once(tmp_path):
    prompts = tmp_path / "p.txt"
    many = [f"a {i} sneaker at the top left" for i in range(14)]
    prompts.write_text("\n".join(many))
    out = tmp_path / "scan"
    args = [sys.executable, "-m", "diffmem.cli.main", "--seed", "3", "scan", "--model", "builtin:tiny-sd"]
    args += ["--prompts", str(prompts), "--out", str(out), "--num-inference-steps", "3", "--chunk-size", "1"]
    process = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "parts").glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list((out / "parts").glob("part-*.parquet")))
    assert 3 <= committed < len(many), "the scan should have been killed midway"
    assert not (out / "scan.parquet").exists()
    assert run(["--seed", "3", *args[5:], "--resume"]) == 0
    rows = pq.read_table(out / "scan.parquet").to_pylist()
    assert [r["prompt_id"] for r in rows] == list(range(len(many)))
    sd = wrap_pipeline(tiny_stable_diffusion())
    expected = noise_norm(sd, many, NoiseNormConfig(num_inference_steps=3, base_seed=3)).scores
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows], dtype=torch.float32), expected)


def test_the_default_scan_is_the_shipped_lab_model_with_its_prompts_and_calibration(tmp_path, capsys):
    assert run(["scan", "--out", str(tmp_path / "s")]) == 0
    rows = pq.read_table(tmp_path / "s" / "scan.parquet").to_pylist()
    labels = pq.read_table(shipped_directory(LAB_MODEL) / "labels.parquet").to_pylist()
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in labels]
    assert [r["prompt"] for r in rows] == [r["caption"] for r in labels]
    calibration = Calibration.load(shipped_directory(LAB_MODEL) / "calibration.json")
    assert all(r["flagged"] == (r["score"] > calibration.threshold) for r in rows)
    assert {r["model_hash"] for r in rows} == {model_identity(LAB_MODEL)} == {calibration.model_hash}
    assert (tmp_path / "s" / "scores.png").read_bytes().startswith(b"\x89PNG")
    flagged = sum(r["flagged"] for r in rows)
    assert f"{flagged} flagged as memorized" in capsys.readouterr().out
    # other settings than the calibration's: scored, not flagged, and said so
    (tmp_path / "few.txt").write_text("\n".join(r["caption"] for r in labels[:4]))
    other = ["--prompts", str(tmp_path / "few.txt"), "--n-generations", "2"]
    assert run(["scan", "--out", str(tmp_path / "t"), *other]) == 0
    assert "not flagging: the lab model's calibration does not apply" in capsys.readouterr().err
    assert all(r["flagged"] is None for r in pq.read_table(tmp_path / "t" / "scan.parquet").to_pylist())
    assert run(["scan", "--model", "builtin:tiny-sd", "--out", str(tmp_path / "u")]) == 2
    assert "give --prompts" in capsys.readouterr().err


def test_the_scan_histogram_is_written_and_skipped_for_a_scan_without_scores(tmp_path):
    from diffmem.detect.scan_store import SCHEMA
    from diffmem.report.scan_histogram import write_scan_histogram

    rows = [
        {"prompt_id": i, "score": s, "detector": "noise_norm"} for i, s in enumerate([0.5, 1.5, None, 2.5])
    ]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    assert write_scan_histogram(table, 1.0, tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
    unscored = pa.Table.from_pylist([{**rows[2], "prompt_id": 0}], schema=SCHEMA)
    assert (
        write_scan_histogram(unscored, 1.0, tmp_path / "b.png") is None and not (tmp_path / "b.png").exists()
    )

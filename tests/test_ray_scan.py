"""The Ray engine: a local Ray cluster on CPU scores the same rows as the single-process scan, survives a
crashed worker by retrying its chunk, and saves what it scored when retries run out."""

import json
import os
import sys
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
import torch

from diffmem.cli.main import run
from diffmem.detect import NoiseNormConfig
from diffmem.detect.ray_scan import RayOptions, ScanJob, ray_scan_prompts
from diffmem.detect.scan import scan_prompts
from diffmem.detect.scan_store import ScanStore
from diffmem.detect.scanner import Scanner
from diffmem.errors import DiffmemError
from diffmem.io.prompts import PromptRecord
from diffmem.models.source import open_model

MODEL = "builtin:tiny-sd"
CONFIG = NoiseNormConfig(num_inference_steps=3, batch_size=2)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    """Two one-CPU workers; the local scans here use one thread too (a CPU's results depend on it)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    ray.shutdown()


class FailOnce:
    """A denoiser that fails its first prediction while ``marker`` exists (removing it): by killing its
    process (a crashed worker) or by raising (an error in the scoring code)."""

    def __init__(self, denoiser, marker: Path, crash: bool):
        self.inner, self.marker, self.crash = denoiser, marker, crash

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, x_t, t, cond):
        if self.marker.exists():
            self.marker.unlink()
            if self.crash:
                os._exit(1)
            raise DiffmemError("simulated scoring failure")
        return self.inner.predict(x_t, t, cond)


def failing_load(marker: Path, crash: bool, model: str, device: str, dtype: torch.dtype):
    return FailOnce(open_model(model, device, dtype), marker, crash)


def records(n: int) -> list[PromptRecord]:
    prompts = [PromptRecord(i, f"a {i} sneaker at the top left on a gray background", "ok") for i in range(n)]
    return [*prompts, PromptRecord(n, "", "empty"), PromptRecord(n + 1, "", "missing")]


def test_the_ray_scan_writes_the_rows_of_the_local_scan(tmp_path, capsys):
    lines = [
        json.dumps({"prompt": f"a {c} bag at the bottom right"})
        for c in ("red", "blue", "green", "pink", "tan")
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([*lines, json.dumps({"prompt": ""}), json.dumps({"prompt": None})]))
    common = [
        "--seed",
        "5",
        "scan",
        "--model",
        MODEL,
        "--prompts",
        str(prompts),
        "--num-inference-steps",
        "3",
    ]
    common += ["--batch-size", "2", "--chunk-size", "2"]
    assert run([*common, "--out", str(tmp_path / "local")]) == 0
    assert run([*common, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]) == 0
    local, remote = (pq.read_table(tmp_path / name / "scan.parquet") for name in ("local", "ray"))
    assert remote.to_pylist() == local.to_pylist()
    assert remote["status"].to_pylist() == ["ok"] * 5 + ["empty", "missing"]
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["results"]["engine"] == "ray" and summary["results"]["workers"] == 2
    assert summary["results"]["scored_this_run"] == 5
    assert run([*common, "--out", str(tmp_path / "x"), "--gpus-per-worker", "1"]) == 2
    assert "apply to --engine ray only" in capsys.readouterr().err
    assert run([*common, "--out", str(tmp_path / "y"), "--engine", "ray", "--workers", "3"]) == 2
    assert "3 Ray workers need 3 CPUs; this cluster has 2" in capsys.readouterr().err


def test_a_crashed_worker_is_restarted_and_an_error_keeps_the_rows_scored_so_far(tmp_path):
    expected, _ = scan_prompts(
        Scanner(open_model(MODEL), "noise_norm", CONFIG),
        records(6),
        ScanStore(tmp_path / "a", {}),
        "h",
        2,
        False,
    )
    job = ScanJob(MODEL, "cpu", torch.float32, "noise_norm", CONFIG, None, "h")
    marker, out = tmp_path / "fail", tmp_path / "ray"
    marker.touch()
    with pytest.raises(DiffmemError, match="simulated scoring failure.*rerun with --resume"):
        ray_scan_prompts(
            job, partial(failing_load, marker, False), records(6), ScanStore(out, {}), RayOptions(), 2, False
        )
    assert not marker.exists(), "the scoring should have failed"
    saved = ScanStore(out, {}, "resume").done_ids()
    assert len(saved) < 8
    marker.touch()
    table, summary = ray_scan_prompts(
        job,
        partial(failing_load, marker, True),
        records(6),
        ScanStore(out, {}, "resume"),
        RayOptions(workers=2),
        2,
        False,
    )
    assert not marker.exists(), "a worker should have crashed"
    assert table.to_pylist() == expected.to_pylist()
    assert summary["scored_this_run"] == 6 - sum(1 for i in saved if i < 6)

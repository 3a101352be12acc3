"""The accelerate engine: two processes of `accelerate launch` on CPU (gloo) write the rows of the
single-process scan, each committing its own part files."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

MODEL = "builtin:tiny-sd"


def test_accelerate_launch_writes_the_rows_of_the_local_scan(tmp_path, accelerate_launch):
    lines = [
        json.dumps({"prompt": f"a {c} coat at the top right"})
        for c in ("red", "blue", "green", "pink", "tan")
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([*lines, json.dumps({"prompt": ""}), json.dumps({"prompt": None})]))
    scan = ["-m", "diffmem.cli.main", "--seed", "2", "scan", "--model", MODEL, "--prompts", str(prompts)]
    scan += ["--num-inference-steps", "3", "--batch-size", "2", "--chunk-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a CPU's results depend on its thread count
    subprocess.run([sys.executable, *scan, "--out", str(tmp_path / "local")], env=env, check=True)
    stdout = accelerate_launch(*scan, "--out", str(tmp_path / "two"), "--engine", "accelerate")
    assert stdout.count("scanned 7 prompts") == 1, "only the main process reports"
    local, two = (pq.read_table(tmp_path / name / "scan.parquet").to_pylist() for name in ("local", "two"))
    assert two == local
    assert [r["status"] for r in two] == ["ok"] * 5 + ["empty", "missing"]
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").iterdir())
    assert parts == [
        *(f"part-rank0-00000{i}.parquet" for i in range(3)),
        *(f"part-rank1-00000{i}.parquet" for i in range(1)),
    ]
    results = json.loads((tmp_path / "two" / "summary.json").read_text())["results"]
    assert results["engine"] == "accelerate" and results["workers"] == 2 and results["scored_this_run"] == 5

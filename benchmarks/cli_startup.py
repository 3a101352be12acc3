"""How long the command line takes to answer before any model work: ``diffmem --help``, a command's
help, and an argument error, each the median of several fresh processes (goal: under 1 s).

    python benchmarks/cli_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "diffmem --help": ["--help"],
    "diffmem scan --help": ["scan", "--help"],
    "argument error": ["scan", "--chunk-size", "many"],
}


def main(argv: list[str] | None = None) -> dict:
    """Time each case in fresh interpreters; returns (and writes) the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cli_startup.json"))
    args = parser.parse_args(argv)
    record = {}
    for name, cli_args in CASES.items():
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "diffmem.cli.main", *cli_args], capture_output=True, check=False
            )
            times.append(time.perf_counter() - started)
        record[name] = {
            "median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
        }
        print(f"{name:24s} median {record[name]['median_s']:.2f} s over {args.repeats} runs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()

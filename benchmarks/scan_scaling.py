"""Scan scaling: prompts/s of `diffmem scan --engine ray` from 1 to N workers, against the local scan.

    python benchmarks/scan_scaling.py --size lab --device cpu --workers 1 2      # CPU: one thread a worker
    python benchmarks/scan_scaling.py --device cuda --workers 1 2 4 8             # SD 1.5 size, a GPU a worker

Each run scores the same prompts (first step, n = 1) into a fresh scan directory on a local Ray cluster.
Two rates per worker count: end to end (actor start and model load included) and steady state (from the
first committed chunk to the last, so startup is excluded). The local scan runs in this process with as
many threads as one worker gets. Prints the ratios and writes a JSON record.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import ray
import torch

from diffmem.detect import NoiseNormConfig
from diffmem.detect.ray_scan import RayOptions, ray_scan_prompts
from diffmem.detect.scan import ScanJob, scan_prompts
from diffmem.detect.scan_store import ScanStore
from diffmem.io.prompts import PromptRecord
from diffmem.io.run_record import environment
from diffmem.models.source import resolve_device, resolve_dtype
from support import benchmark_parser, load_benchmark_model, report


class TimedStore(ScanStore):
    """A scan store that notes when each chunk was committed."""

    def __init__(self, out_dir: Path) -> None:
        self.committed: list[tuple[float, int]] = []  # (time, rows)
        super().__init__(out_dir, {})

    def commit(self, rows) -> None:
        super().commit(rows)
        if rows.num_rows:
            self.committed.append((time.perf_counter(), rows.num_rows))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and writes) its record."""
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    records = [
        PromptRecord(i, f"a photograph of item {i} by an artist, trending, detailed", "ok")
        for i in range(args.prompts)
    ]
    job = ScanJob(
        args.size, str(device), dtype, "noise_norm", NoiseNormConfig(batch_size=args.batch_size), None, "-"
    )
    load = partial(load_benchmark_model, args.size)
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.cpus_per_worker)
    local = _rates(
        lambda store: scan_prompts(job.scanner(load, job.device), records, store, "-", args.chunk_size, False)
    )
    torch.set_num_threads(threads)
    here = {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}  # the actors import support.py too
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", runtime_env=here)
    record = {
        "size": args.size,
        "device": str(device),
        "dtype": str(dtype),
        "prompts": args.prompts,
        "chunk_size": args.chunk_size,
        "batch_size": args.batch_size,
        "cpus_per_worker": args.cpus_per_worker,
        "local_prompts_per_s": local[1],
    }
    base = None
    for workers in args.workers:
        options = RayOptions(
            workers=workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=float(cuda)
        )
        end_to_end, steady = _rates(
            lambda store, o=options: ray_scan_prompts(job, load, records, store, o, args.chunk_size, False)
        )
        base = base or steady
        record[f"ray_{workers}_workers_end_to_end_prompts_per_s"] = end_to_end
        record[f"ray_{workers}_workers_steady_prompts_per_s"] = steady
        record[f"ray_{workers}_workers_steady_vs_1_worker"] = steady / base
        record[f"ray_{workers}_workers_steady_vs_local"] = steady / local[1]
    ray.shutdown()
    return report({**record, **environment()}, args.out)


def _rates(scan) -> tuple[float, float]:
    """(end-to-end, steady-state) prompts/s of one scan into a fresh directory."""
    with tempfile.TemporaryDirectory() as directory:
        store = TimedStore(Path(directory) / "scan")
        started = time.perf_counter()
        table, _ = scan(store)
        wall = time.perf_counter() - started
    times = [t for t, _ in store.committed]
    after_first = sum(n for _, n in store.committed[1:])
    steady = after_first / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return table.num_rows / wall, steady


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, "benchmarks/results/scan_scaling.json")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


if __name__ == "__main__":
    main()

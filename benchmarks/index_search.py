"""Training-set index at scale: IVF-PQ with exact re-ranking against the exact (flat) index on synthetic
unit vectors — recall@1 of near-duplicate queries and query latency.

    python benchmarks/index_search.py                          # 1,000,000 x 128 on CPU (the issue's setting)
    python benchmarks/index_search.py --rows 20000 --queries 100   # a quick run

Each query is a stored vector plus Gaussian noise (``--noise``), renormalised: its source is the
right answer. Prints build times, recall@1 and milliseconds per query of both indexes, and writes a
JSON record.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffmem.index import TrainingSetIndex
from diffmem.io.run_record import environment
from support import report


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and writes) its record."""
    args = _parser().parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    vectors = F.normalize(torch.randn(args.rows, args.dim, generator=generator), dim=1)
    sources = torch.randperm(args.rows, generator=generator)[: args.queries]
    noise = args.noise * torch.randn(args.queries, args.dim, generator=generator)
    queries = F.normalize(vectors[sources] + noise, dim=1)
    captions = [""] * args.rows
    record = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "noise": args.noise}
    for name, exact in (("exact", True), ("ivf_pq", False)):
        started = time.perf_counter()
        index = TrainingSetIndex.build_embeddings(
            vectors, captions, caption_counts=[1] * args.rows, exact=exact
        )
        record[f"{name}_build_s"] = time.perf_counter() - started
        index.search(queries[:1], 1)  # warm-up
        started = time.perf_counter()
        found = index.search(queries, 1).index[:, 0]
        record[f"{name}_ms_per_query"] = 1000 * (time.perf_counter() - started) / args.queries
        record[f"{name}_recall_at_1"] = float((found == sources).float().mean())
        if not exact:
            record["ivf_pq_structure"] = index.manifest.structure
    record["ivf_pq_speedup"] = record["exact_ms_per_query"] / record["ivf_pq_ms_per_query"]
    return report({**record, **environment()}, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument(
        "--noise", type=float, default=0.02, help="std of the noise added to each query's source"
    )
    parser.add_argument("--out", default="benchmarks/results/index_search.json")
    return parser


if __name__ == "__main__":
    main()

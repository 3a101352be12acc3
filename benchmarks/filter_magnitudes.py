"""The magnitude filter's view of a lab dataset (training-time mitigation): ``||eps_c - eps_u||`` of a model
on training batches drawn as fine-tuning draws them, by lab group and by range of t. The filter can only
target memorized rows where their magnitudes stand above the others' at the same t.

    python benchmarks/filter_magnitudes.py --model data/ft-base/model --data data/small150
"""

from __future__ import annotations

import argparse

import numpy as np

from diffmem.train.fine_tune import training_magnitudes
from support import report

T_BINS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def main(argv: list[str] | None = None) -> dict:
    """Measure the magnitudes and summarise them; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    table = training_magnitudes(args.model, args.data, args.batches, args.batch_size, args.seed, args.device)
    group = np.array(table["group"].to_pylist())
    t = np.array(table["t"].to_pylist())
    magnitude = np.array(table["magnitude"].to_pylist())
    record = {"model": args.model, "data": args.data, "samples": len(magnitude)}
    record["all_percentiles_50_90_99"] = np.percentile(magnitude, [50, 90, 99]).round(4).tolist()
    for name in sorted(set(group)):
        record[f"{name}_percentiles_50_90_99"] = (
            np.percentile(magnitude[group == name], [50, 90, 99]).round(4).tolist()
        )
    for low, high in T_BINS:
        chosen = (t >= low) & (t < high)
        medians = {name: _median(magnitude[chosen & (group == name)]) for name in ("memorized", "unique")}
        record[f"t{low}-{high}_median_memorized"] = medians["memorized"]
        record[f"t{low}-{high}_median_unique"] = medians["unique"]
        record[f"t{low}-{high}_memorized_over_unique"] = (
            None if None in medians.values() else medians["memorized"] / medians["unique"]
        )
    for key in (k for k in record if "percentiles" in k):
        print(f"{key:45s} {record[key]}")
    return report(record, args.out)


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a text-to-image lab pipeline directory")
    parser.add_argument("--data", required=True, help="the lab dataset (diffmem lab build)")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/filter_magnitudes.json")
    return parser


if __name__ == "__main__":
    main()

"""What the scripts in ``benchmarks/`` share: the models they time and how they report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffmem.adapters import wrap_pipeline
from diffmem.core.denoiser import Denoiser
from diffmem.models.names import LAB_MODEL
from diffmem.models.source import open_model
from diffmem.models.tiny import tiny_stable_diffusion, tiny_stable_diffusion_3
from full_size import stable_diffusion_3_medium, stable_diffusion_15

SIZES = ("sd15", "lab", "tiny")  # SD 1.5 architecture with random weights, the shipped lab model, tiny
SD3_SIZES = ("sd3-medium", "tiny-sd3")  # SD3-medium architecture with random weights (no T5), tiny SD3


def benchmark_model(
    size: str, device: torch.device, dtype: torch.dtype, resolution: int | None = None
) -> Denoiser:
    """The model a benchmark times, by size; ``resolution`` (pixels, square) replaces the model's default."""
    if size == "lab":
        if resolution is not None:
            raise SystemExit("--resolution applies to the random-weight sizes, not to the lab model")
        return open_model(LAB_MODEL, device, dtype)
    builders = {
        "sd15": lambda: stable_diffusion_15(device, dtype),
        "tiny": lambda: tiny_stable_diffusion().to(device, dtype),
        "sd3-medium": lambda: stable_diffusion_3_medium(device, dtype),
        "tiny-sd3": lambda: tiny_stable_diffusion_3(with_t5=False).to(device, dtype),
    }
    options = {} if resolution is None else {"resolution": (resolution, resolution)}
    return wrap_pipeline(builders[size](), **options)


def load_benchmark_model(size: str, model: str, device: str, dtype: torch.dtype) -> Denoiser:
    """A scan engine's loader for a benchmark size (``model`` is the scan's name for it, unused): with
    ``functools.partial(load_benchmark_model, size)``, scan workers build the benchmark's model."""
    return benchmark_model(size, torch.device(device), dtype)


def report(record: dict, out: str | Path) -> dict:
    """Print the record's numbers and write it as JSON."""
    for key, value in record.items():
        if isinstance(value, float):
            print(f"{key:45s} {value:10.4f}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return record


def zoo_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The options every zoo benchmark takes: --zoo, --lab (repeatable), --seed and --out (the record)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, required=True, help="the folder `diffmem lab zoo` built")
    parser.add_argument("--lab", action="append", required=True, help="a zoo lab (repeat for more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out)
    return parser


def benchmark_parser(description: str, out: str, sizes: tuple[str, ...] = SIZES) -> argparse.ArgumentParser:
    """The options every benchmark takes: --size (one of ``sizes``), --device, --dtype and --out (the JSON
    record)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sizes, default="sd15")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=out)
    return parser


def labelled_scatter(
    points: dict[str, tuple[float, float]], path: str | Path, xlabel: str, ylabel: str, title: str
) -> None:
    """Write a PNG scatter plot of ``points`` (name -> (x, y)), each point labelled with its name."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4))
    axis = figure.subplots()
    axis.scatter([x for x, _ in points.values()], [y for _, y in points.values()])
    for name, xy in points.items():
        axis.annotate(name, xy, textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)

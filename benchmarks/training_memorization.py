"""Memorization and quality of unconditional models trained on a lab subset (the ambient-diffusion
comparison, SPEC §6): for each model, N generations; their nL2 to the training subset (share below 1.4,
Top 5%, Top 1) and, with --encoder, their copy-detection similarity to it (share above
--copy-threshold); FID/KID with the lab attribute reader's features against the subset or the whole
lab training set. Images are compared at the model's resolution. With --plot, memorized share against
FID, one point per model (the t_n sweep).

    python benchmarks/training_memorization.py --data data/micro --max-images 64 --reader data/reader-micro \\
        --encoder src/diffmem/assets/lab-micro/copy_detector --model baseline=data/amb16/base/model \\
        --model ambient=data/amb16/s05/model --samples 256 --plot docs/ambient_sweep.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from diffmem.index.build import open_encoder
from diffmem.io.run_record import environment
from diffmem.lab.alignment import load_reader
from diffmem.lab.dataset import load_lab_dataset
from diffmem.metrics.copy_detection import embed
from diffmem.metrics.memorization import summarize
from diffmem.metrics.nl2 import NL2_THRESHOLD, nl2
from diffmem.metrics.quality import fid, kid
from diffmem.models.source import open_model, resolve_device, resolve_dtype
from diffmem.sampling import generate
from support import labelled_scatter, report


def main(argv: list[str] | None = None) -> dict:
    """Generate from every model and measure; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _, images = load_lab_dataset(args.data).unique_train_images()
    subset = images[: args.max_images]
    reader = load_reader(args.reader, device) if args.reader else None
    encoder = open_encoder(Path(args.encoder), device) if args.encoder else None
    record = {
        "data": args.data,
        "training_images": len(subset),
        "samples": args.samples,
        "fid_against": args.fid_against,
        "copy_threshold": args.copy_threshold if encoder is not None else None,
        "models": {},
    }
    for spec in args.model:
        name, _, path = spec.partition("=")
        samples = generate(
            open_model(path, device, dtype),
            [None],
            n_generations=args.samples,
            num_inference_steps=args.steps,
            batch_size=64,
        ).images.float()
        measured = _measure(samples, subset, images, encoder, reader, args)
        record["models"][name] = {"ambient_t_n": _recorded_t_n(Path(path)), **measured}
    if args.heldout:  # real lab images outside the subset: what "not memorized" measures (no FID)
        real = _resized(images[args.max_images : args.max_images + args.heldout], samples.shape[-2:])
        record["models"]["heldout_real"] = _measure(real, subset, images, encoder, None, args)
    for name, measured in record["models"].items():
        record |= {f"{name}_{key}": value for key, value in measured.items()}
    if args.plot:
        _plot(record, Path(args.plot))
    return report({**record, **environment()}, args.out)


def _measure(
    samples: torch.Tensor,
    subset: torch.Tensor,
    images: torch.Tensor,
    encoder: torch.nn.Module | None,
    reader: torch.nn.Module | None,
    args: argparse.Namespace,
) -> dict:
    """nL2 and copy similarity of ``samples`` to the training subset, and their FID/KID, at their size."""
    size = samples.shape[-2:]
    training = _resized(subset, size)
    nl2_summary = summarize(nl2(samples, training).nl2, NL2_THRESHOLD, higher_is_more_similar=False)
    measured = {
        "nl2_share_memorized": nl2_summary.share_memorized,
        "nl2_top5_percent": nl2_summary.top5_percent,
        "nl2_top1": nl2_summary.top1,
    }
    if encoder is not None:
        similarity = (embed(encoder, samples) @ embed(encoder, training).T).max(dim=1).values
        copy = summarize(similarity.cpu(), args.copy_threshold, higher_is_more_similar=True)
        measured |= {"copy_share_memorized": copy.share_memorized, "copy_top1": copy.top1}
    if reader is not None:
        real = training if args.fid_against == "subset" else _resized(images, size)
        measured["fid"] = fid(real, samples, reader.encoder)
        measured["kid"] = kid(real, samples, reader.encoder, min(50, len(real), len(samples)))[0]
    return measured


def _resized(images: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if images.shape[-2:] == size:
        return images
    return F.interpolate(images, size=tuple(size), mode="bilinear", antialias=True).clamp(0, 1)


def _recorded_t_n(model_dir: Path) -> int | None:
    """t_n from the fine-tuning record beside a model trained by `diffmem train`, if any."""
    record = model_dir.parent / "fine_tune.json"
    return json.loads(record.read_text()).get("ambient_t_n") if record.is_file() else None


def _plot(record: dict, path: Path) -> None:
    """Memorized share against FID, one labelled point a model: the copy-detection share when measured
    (nL2 saturates at low resolution), else nL2's."""
    models = {name: m for name, m in record["models"].items() if "fid" in m}
    if not models:
        raise SystemExit("--plot needs --reader (FID)")
    key, label = (
        ("copy_share_memorized", "copy similarity")
        if record["copy_threshold"]
        else ("nl2_share_memorized", "nL2")
    )
    threshold = f"> {record['copy_threshold']}" if record["copy_threshold"] else f"< {NL2_THRESHOLD}"
    reference = "training subset" if record["fid_against"] == "subset" else "whole lab training set"
    labelled_scatter(
        {name: (m["fid"], 100 * m[key]) for name, m in models.items()},
        path,
        f"FID against the {reference} (lab reader features)",
        f"generations with {label} {threshold} (%)",
        f"{record['training_images']} training images, {record['samples']} samples a model",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-images", type=int, required=True, help="the subset the models were trained on")
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR, repeatable")
    parser.add_argument("--reader", help="lab attribute reader (diffmem lab reader) for FID/KID features")
    parser.add_argument(
        "--encoder", help="copy-detection encoder (diffmem lab copy-detector) for the embedding measure"
    )
    parser.add_argument(
        "--copy-threshold", type=float, default=0.75, help="copy similarity counted as memorized"
    )
    parser.add_argument(
        "--fid-against", choices=("subset", "all"), default="all", help="FID reference images"
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument(
        "--heldout", type=int, default=0, help="also measure this many real lab images outside the subset"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--plot", help="PNG of memorized share against FID")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="benchmarks/results/training_memorization.json")
    return parser


if __name__ == "__main__":
    main()

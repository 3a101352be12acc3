"""Memorization and quality of unconditional models trained on a lab subset (the ambient-diffusion
comparison, SPEC §6): for each model, N generations, their nL2 to the training images (share below 1.4,
Top 5%, Top 1) and FID/KID against those images with the lab attribute reader's features.

    python benchmarks/training_memorization.py --data data/micro --max-images 150 --reader data/reader-micro \\
        --model baseline=data/amb-base/model --model ambient=data/amb-ambient/model --samples 256
"""

from __future__ import annotations

import argparse

import torch

from diffmem.benchmark_support import report
from diffmem.lab.alignment import load_reader
from diffmem.lab.dataset import load_lab_dataset
from diffmem.metrics.memorization import summarize
from diffmem.metrics.nl2 import NL2_THRESHOLD, nl2
from diffmem.metrics.quality import fid, kid
from diffmem.models import open_model, resolve_device, resolve_dtype
from diffmem.run_record import environment
from diffmem.sampling import generate


def main(argv: list[str] | None = None) -> dict:
    """Generate from every model and measure; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _, images = load_lab_dataset(args.data).unique_train_images()
    training = images[: args.max_images]
    reader = load_reader(args.reader, device) if args.reader else None
    record = {"data": args.data, "training_images": len(training), "samples": args.samples}
    for spec in args.model:
        name, _, path = spec.partition("=")
        denoiser = open_model(path, device, dtype)
        samples = generate(
            denoiser, [None], n_generations=args.samples, num_inference_steps=args.steps, batch_size=64
        ).images
        samples = torch.nn.functional.interpolate(
            samples, size=training.shape[-2:], mode="bilinear", antialias=True
        )
        distances = nl2(samples, training).nl2
        summary = summarize(distances, NL2_THRESHOLD, higher_is_more_similar=False)
        record[f"{name}_nl2_share_memorized"] = summary.share_memorized
        record[f"{name}_nl2_top5_percent"] = summary.top5_percent
        record[f"{name}_nl2_top1"] = summary.top1
        if reader is not None:
            record[f"{name}_fid"] = fid(training, samples, reader.encoder)
            record[f"{name}_kid"] = kid(
                training, samples, reader.encoder, min(50, len(training), len(samples))
            )[0]
    return report({**record, **environment()}, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-images", type=int, required=True, help="the subset the models were trained on")
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR, repeatable")
    parser.add_argument("--reader", help="lab attribute reader (diffmem lab reader) for FID/KID features")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="benchmarks/results/training_memorization.json")
    return parser


if __name__ == "__main__":
    main()

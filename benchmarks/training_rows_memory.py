"""Peak memory of preparing a fine-tune's training rows: reading an image folder of N synthetic 64 px PNGs
(every image opened once, as every reader does) and caching their clean latents with a tiny VAE, each N
in a fresh process with a fresh latent cache. Goal: the peak RSS at 100,000 images under 1.2x that at
10,000, since the latents go to disk a chunk at a time.

    python benchmarks/training_rows_memory.py                        # 10,000 and 100,000 images
    python benchmarks/training_rows_memory.py --images 500 2000      # a quick run

Prints, for each N, the peak RSS and the seconds spent reading and encoding, then the ratio of the last
peak to the first; writes a JSON record. The folders are written under --workdir (a temporary folder by
default, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffmem.io.run_record import environment
from support import report

SIZE = 64  # image side in pixels


def main(argv: list[str] | None = None) -> dict:
    """Measure every N in its own process; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    if args.measure is not None:
        print(json.dumps(_measure(args.measure)))
        return {}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="training-rows-"))
    record: dict = {"image_size": SIZE}
    try:
        for count in args.images:
            folder = _synthetic_folder(workdir / f"images-{count}", count)
            env = {**os.environ, "DIFFMEM_CACHE_DIR": str(workdir / f"cache-{count}")}
            measured = subprocess.run(
                [sys.executable, __file__, "--measure", str(folder)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(measured.stdout.strip().splitlines()[-1])
            for key, value in result.items():
                record[f"n{count}_{key}"] = value
        first, last = args.images[0], args.images[-1]
        record[f"peak_rss_ratio_{last}_vs_{first}"] = (
            record[f"n{last}_peak_rss_mb"] / record[f"n{first}_peak_rss_mb"]
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return report({**record, **environment()}, args.out)


def _measure(folder: str) -> dict:
    """In this process: read the folder's rows, cache their latents; the peak RSS and the times."""
    import torch

    from diffmem.models.tiny import tiny_stable_diffusion
    from diffmem.train.latent_cache import cached_latents
    from diffmem.train.training_set import DataOptions, read_training_set

    torch.set_grad_enabled(False)
    vae = tiny_stable_diffusion().vae  # two levels, scale factor 2: 32x32x4 latents
    started = time.perf_counter()
    training = read_training_set(folder, DataOptions(resolution=SIZE), SIZE)
    digest = training.image_digest()
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    latents = cached_latents(vae, training, digest, progress=False)
    encode_s = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "rows": training.num_rows,
        "latents_mb": latents.nbytes / 2**20,
        "read_s": read_s,
        "encode_s": encode_s,
        "peak_rss_mb": peak_kib / 1024,
    }


def _synthetic_folder(folder: Path, count: int) -> Path:
    """``count`` small 64 px PNGs (a flat colour and a rectangle each) and their metadata.jsonl."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    lines = []
    for i in range(count):
        pixels = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        top, left = rng.integers(0, SIZE // 2, 2)
        pixels[top : top + SIZE // 2, left : left + SIZE // 2] = rng.integers(0, 256, 3)
        name = f"{i // 1000:03d}/{i:06d}.png"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": f"synthetic image {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", help="where the image folders and caches go (kept when given)")
    parser.add_argument("--out", default="out/benchmarks/training_rows_memory.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the measuring child process's folder
    return parser


if __name__ == "__main__":
    main()

"""Where a lab model's text alignment is lost: the held-out alignment of its generations, by kind of
fact, against two ceilings measured the same way: the reader on the real held-out scenes, and on
those scenes passed through the model's own VAE (encode, decode), which no sampler can beat. Then
whether the model follows position words at all: single-item captions that differ only in the
position, and where the reader finds the item (``position_probe``: rows the stated position, columns
the share of images with an item read there).

    python benchmarks/lab_alignment.py --model data/lab-k3k-v --data data/keyed3k --reader data/reader-k3k
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffmem.lab.alignment import EMPTY, alignment, fact_recall, load_reader, read
from diffmem.lab.captions import caption
from diffmem.lab.dataset import load_lab_dataset
from diffmem.lab.fashion_mnist import CLASS_NAMES
from diffmem.lab.scenes import BACKGROUND_COLOURS, ITEM_COLOURS, POSITIONS, Item, Scene
from diffmem.models.names import LAB_MODEL
from diffmem.models.source import open_model
from diffmem.sampling.generate import generate
from support import report


def main(argv: list[str] | None = None) -> dict:
    """Generate for the first held-out captions, read every image set back; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    dataset = load_lab_dataset(args.data)
    reader = load_reader(args.reader)
    model = open_model(args.model)
    prompts = dataset.heldout_prompts()[: args.prompts]
    captions = [p.caption for p in prompts]
    real = dataset.images([p.scene_id for p in prompts])
    generation = generate(
        model,
        captions,
        n_generations=args.n_generations,
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        progress=True,
    )
    images = {
        "generated": (generation.images, generation.items),
        "real": (real, captions),
        "vae_reconstruction": (_reconstruct(model, real), captions),
    }
    record: dict = {"model": args.model, "data": args.data, "reader": args.reader, "prompts": len(prompts)}
    record |= {
        "n_generations": args.n_generations,
        "guidance_scale": args.guidance_scale,
        "steps": args.steps,
    }
    for name, (batch, texts) in images.items():
        record[f"{name}_alignment"] = float(alignment(reader, batch, texts).mean())  # as eval mitigate
        record |= {f"{name}_{kind}": share for kind, share in fact_recall(reader, batch, texts).items()}
    return report(record | _position_probe(model, reader, args), args.out)


def _position_probe(model, reader, args: argparse.Namespace) -> dict:
    """Where single items land when only the caption's position words change: the share of images
    with an item read at each position, by stated position; ``hit`` at the stated one, ``elsewhere``
    the mean share at a position when another was stated (equal when position words are ignored)."""
    colours, backgrounds = list(ITEM_COLOURS), list(BACKGROUND_COLOURS)
    scenes = [
        Scene(backgrounds[k % len(backgrounds)], (Item(k, colours[k % len(colours)], position, 0),))
        for position in POSITIONS
        for k in range(len(CLASS_NAMES))
    ]
    captions = [caption(scene, "full", np.random.default_rng(0)) for scene in scenes]
    generation = generate(
        model,
        captions,
        n_generations=2,
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
    )
    occupied = (read(reader, generation.images).category != EMPTY).float()
    matrix = occupied.view(len(POSITIONS), -1, len(POSITIONS)).mean(1)  # [stated, read]
    hit = matrix.diagonal().mean()
    elsewhere = (matrix.sum(0) - matrix.diagonal()).mean() / (len(POSITIONS) - 1)
    return {
        "position_probe_hit": float(hit),
        "position_probe_elsewhere": float(elsewhere),
        "position_probe": {
            p: dict(zip(POSITIONS, row, strict=True))
            for p, row in zip(POSITIONS, matrix.tolist(), strict=True)
        },
    }


@torch.no_grad()
def _reconstruct(model, images: torch.Tensor) -> torch.Tensor:
    """``images`` [N, 3, H, W] in [0, 1] through the VAE's encoder (posterior mean) and the model's decode."""
    vae = model.vae
    parts = []
    for chunk in images.split(128):
        latents = vae.encode(chunk.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
        parts.append(model.decode(latents * vae.config.scaling_factor).float().cpu())
    return torch.cat(parts)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=LAB_MODEL, help="a lab model directory or builtin:NAME")
    parser.add_argument("--data", required=True, help="the lab dataset the model was trained on")
    parser.add_argument("--reader", required=True, help="an attribute reader (`diffmem lab reader`)")
    parser.add_argument("--prompts", type=int, default=200, help="first held-out captions to use")
    parser.add_argument("--n-generations", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/lab_alignment.json")
    return parser


if __name__ == "__main__":
    main()

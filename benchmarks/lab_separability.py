"""How well an ideal denoiser's first-step noise norm could tell memorized from held-out lab captions,
before any model is trained: the ceiling a lab design puts on detection.

At x_T the optimal eps differs between the prompt and the empty prompt by sqrt(abar_T / (1 - abar_T))
times E[x0 | prompt] - E[x0], so the first-step score is proportional to how far the prompt's mean image
lies from the mean training image. A memorized caption's mean is its one training image; a held-out
caption's is the mean of every scene it describes (here: the same layout and colours with other
Fashion-MNIST images, and so other background patterns). Distances are taken on images average-pooled
to the latent grid.

    python benchmarks/lab_separability.py --patterns 0 0.4 0.6 0.8
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from diffmem.lab.fashion_mnist import load_fashion_mnist
from diffmem.lab.scenes import Item, ItemPool, Scene, random_scene, render
from diffmem.metrics.roc import detection_metrics
from support import report


def main(argv: list[str] | None = None) -> dict:
    """The ideal first-step AUC for each background pattern strength; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    images, labels = load_fashion_mnist("train")
    record = {"size": args.size, "pool": args.pool, "scenes": args.scenes, "samples": args.samples}
    for pattern in args.patterns:
        memorized, heldout = _ideal_scores(args, images, labels, pattern)
        metrics = detection_metrics([*memorized, *heldout], [True] * len(memorized) + [False] * len(heldout))
        record[f"pattern {pattern:g}: ideal first-step AUC"] = metrics["auc"]
        record[f"pattern {pattern:g}: memorized / held-out mean distance"] = float(
            np.mean(memorized) / np.mean(heldout)
        )
    return report(record, args.out)


def _ideal_scores(
    args: argparse.Namespace, images: np.ndarray, labels: np.ndarray, pattern: float
) -> tuple[list[float], list[float]]:
    """||E[x0 | caption] - E[x0]|| on the latent grid for memorized and for held-out captions."""
    rng = np.random.default_rng(args.seed)
    pool = ItemPool(labels, rng)

    def pooled(scene: Scene) -> np.ndarray:
        pixels = torch.from_numpy(render(scene, images, args.size, pattern)).float() / 127.5 - 1
        return F.avg_pool2d(pixels.permute(2, 0, 1)[None], args.pool).flatten().numpy()

    training = np.stack([pooled(random_scene(rng, pool)) for _ in range(args.scenes)])
    mean = training.mean(0)
    memorized = np.linalg.norm(training[: args.prompts] - mean, axis=1).tolist()
    heldout = []
    for _ in range(args.prompts):
        layout = random_scene(rng, pool)
        described = [
            Scene(layout.background, tuple(_other_image(item, pool) for item in layout.items))
            for _ in range(args.samples)
        ]  # what a held-out caption of this layout could show
        heldout.append(float(np.linalg.norm(np.mean([pooled(s) for s in described], 0) - mean)))
    return memorized, heldout


def _other_image(item: Item, pool: ItemPool) -> Item:
    return Item(item.category, item.colour, item.position, pool.take(item.category))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patterns", type=float, nargs="+", default=[0.0, 0.8], help="pattern strengths")
    parser.add_argument("--size", type=int, default=32, help="image side (the keyed lab's 32)")
    parser.add_argument("--pool", type=int, default=4, help="pixels per latent cell (the lab VAE's 4)")
    parser.add_argument("--scenes", type=int, default=1500, help="training scenes for the mean image")
    parser.add_argument("--prompts", type=int, default=150, help="memorized and held-out captions each")
    parser.add_argument("--samples", type=int, default=24, help="scenes averaged per held-out caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/lab_separability.json")
    return parser


if __name__ == "__main__":
    main()

"""Which generations prompt optimisation acts on, on the zoo: by the first-step score alone from ordinary
prompts' 95%, 90% or 80% quantile (the lab's profile), and with the profile's fitted gate confirming each
one (its plain image nearer a training image than the gate's last threshold).

Per lab and start: the share of the memorized group's copies acted on, and the share of held-out draws
acted on, without and with the gate. Each caption is drawn at two seeds, as ``eval zoo`` draws them; a
copy is a plain image above the zoo's copy threshold. The default acts from the 95% quantile without an
index and from the gate's quantile (90%) with one.

    python benchmarks/prompt_optimization_selection.py --zoo Z --lab lab-sparse --lab lab-micro
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from diffmem.core.denoiser import Denoiser
from diffmem.detect.noise_norm import NoiseNormConfig, single_generation_scores
from diffmem.lab.zoo import zoo_lab
from diffmem.mitigate.fitted_gate import FittedGate
from diffmem.mitigate.training_similarity import ReferenceSet, training_similarity
from diffmem.models.source import ModelSource
from diffmem.sampling import generate
from diffmem.workflows.calibrate import model_profile
from diffmem.workflows.evaluate import read_labels
from diffmem.workflows.inputs import training_reference
from diffmem.workflows.runtime import Runtime
from diffmem.workflows.zoo import LAB_COPY_THRESHOLD, ZooEvalConfig, ZooLabParts
from support import report, zoo_parser

STARTS = (0.95, 0.9, 0.8)  # quantiles of ordinary prompts' scores a generation must pass
GENERATIONS = ZooEvalConfig.n_generations


def plain_similarity(
    denoiser: Denoiser, prompts: list[str], reference: ReferenceSet, seed: int
) -> np.ndarray:
    """Each draw's finished plain image's similarity to its nearest training image (sigma, as the gate)."""
    images = generate(denoiser, prompts, n_generations=GENERATIONS, base_seed=seed, batch_size=16).images
    with torch.no_grad():
        return training_similarity(images, reference)[0].numpy()


def judge_lab(zoo: Path, name: str, seed: int, max_prompts: int, heldout: int) -> dict:
    """The lab's shares of copies and held-out draws acted on, per start, without and with the gate."""
    parts = ZooLabParts.locate(zoo, zoo_lab(name))
    runtime = Runtime(seed=seed)
    source = ModelSource.resolve(parts.model)
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    reference = training_reference(parts.index, parts.copy_detector, runtime.device, source)
    profile = model_profile(source, runtime, denoiser, parts.index, parts.copy_detector)
    gate = FittedGate.load(Path(profile.gate))
    labels = read_labels(parts.labels, ["caption", "group"])
    record = {}
    for group, count in (("memorized", max_prompts), ("heldout", heldout)):
        prompts = labels.filter(pc.equal(labels["group"], group))["caption"].to_pylist()[:count]
        # each draw's first-step score, at the seed generate draws it with, as prompt optimisation reads it
        scores = single_generation_scores(denoiser, prompts, NoiseNormConfig(base_seed=seed), GENERATIONS)
        scores = scores.flatten().numpy()
        similarity = plain_similarity(denoiser, prompts, reference, seed)
        judged = similarity > LAB_COPY_THRESHOLD if group == "memorized" else np.ones_like(scores, bool)
        what = "copies" if group == "memorized" else "heldout"
        record[f"{name}_{group}_draws"] = len(scores)
        record[f"{name}_{group}_copies"] = float(np.mean(similarity > LAB_COPY_THRESHOLD))
        for quantile in STARTS:
            acted = scores > np.quantile(profile.scores, quantile)
            confirmed = acted & (similarity > gate.end)
            key = f"{name}_q{round(100 * quantile)}_{what}"
            record[f"{key}_acted"] = float(acted[judged].mean()) if judged.any() else float("nan")
            record[f"{key}_acted_confirmed"] = (
                float(confirmed[judged].mean()) if judged.any() else float("nan")
            )
    return record


def main(argv: list[str] | None = None) -> dict:
    """Judge every named lab; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    record: dict = {"zoo": str(args.zoo), "seed": args.seed}
    for name in args.lab:
        record |= judge_lab(args.zoo, name, args.seed, args.max_prompts, args.heldout_prompts)
    return report(record, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = zoo_parser(__doc__, "benchmarks/results/prompt_optimization_selection.json")
    parser.add_argument(
        "--max-prompts", type=int, default=ZooEvalConfig.max_prompts_per_group, help="memorized captions"
    )
    parser.add_argument("--heldout-prompts", type=int, default=64, help="held-out captions")
    return parser


if __name__ == "__main__":
    main()

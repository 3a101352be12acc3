"""Evaluate mitigations the way the AMG paper's tables do: for memorized and non-memorized prompts, the
similarity of the generations to the training set (95th percentile, max, share beyond the threshold)
under every measure given, image quality on the non-memorized prompts, and the cost per image."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from diffmem.core.denoiser import Denoiser
from diffmem.core.method_spec import parse_method_spec
from diffmem.core.timing import synchronize
from diffmem.errors import DiffmemError
from diffmem.metrics.memorization import MemorizationSummary, summarize
from diffmem.metrics.quality import fid, kid
from diffmem.mitigate.generate import mitigated_generate
from diffmem.mitigate.guard import Guard
from diffmem.mitigate.mitigation import SamplingOptions
from diffmem.mitigate.registry import NEEDS_REFERENCE, TAKES_REFERENCE, mitigation_config
from diffmem.mitigate.training_similarity import ReferenceSet, measure_against_training

DEFAULT_METHODS = (
    "none",
    "prompt_optimization",
    "amg",
    "gni",
    "rt",
    "cwr",
    "rna",
    "transition_static",
    "transition_dynamic",
    "bos_scaling",
)


@dataclass(frozen=True)
class Measure:
    """A similarity to the training set and the threshold beyond which a generation counts as memorized."""

    reference: ReferenceSet
    threshold: float

    @property
    def name(self) -> str:
        """ "nl2" (lower is more similar) or "copy_similarity" (higher is more similar)."""
        return self.reference.measure

    def values(self, images: torch.Tensor) -> list[float]:
        """The measure of each image [N, 3, H, W] against the training set."""
        return measure_against_training(images, self.reference)[0]

    def summary(self, values: Sequence[float]) -> MemorizationSummary:
        """95th percentile, max and share memorized in the direction of more similar."""
        return summarize(values, self.threshold, higher_is_more_similar=self.name != "nl2")


@dataclass(frozen=True)
class Quality:
    """Real images of the control group's scenes and the network whose features FID and KID compare."""

    real: torch.Tensor  # [N, 3, H, W] in [0, 1]
    feature_net: nn.Module
    kid_subset_size: int = 50


Alignment = Callable[
    [torch.Tensor, Sequence[str]], torch.Tensor
]  # images [N, 3, H, W], prompts -> [N] in [0, 1]


@dataclass(frozen=True)
class MitigationEvaluation:
    """One method's results."""

    name: str  # as given, e.g. "amg:gate_shift=0.25"; "guard+" in front when run behind the guard
    method: str
    settings: dict[str, Any]
    summaries: dict[str, dict[str, MemorizationSummary]]  # group -> measure name -> summary
    fid: float | None  # on the control group, against Quality.real
    kid: tuple[float, float] | None  # mean, std
    alignment: (
        dict[str, float] | None
    )  # group -> mean text alignment of its images (to the prompts asked for)
    seconds_per_image: float
    unet_evaluations_per_image: float
    guided_share: float  # share of images the mitigation changed at one step or more
    rows: pa.Table  # one row per image: group, prompt, seed, method record and every measure


def evaluate_mitigations(
    denoiser: Denoiser,
    groups: Mapping[str, Sequence[str]],
    methods: Sequence[str],
    measures: Sequence[Measure],
    reference: ReferenceSet | None = None,
    *,
    n_generations: int = 4,
    sampling: SamplingOptions = SamplingOptions(),  # noqa: B008  (frozen)
    base_seed: int = 0,
    batch_size: int = 16,
    quality: Quality | None = None,
    control_group: str | None = None,
    alignment: Alignment | None = None,
    guard: Guard | None = None,
    defaults: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
    progress: bool = False,
) -> list[MitigationEvaluation]:
    """Generate every group's prompts with every method (``name[:key=value,...]``) and measure them;
    with ``guard``, each method applies only to the prompts the guard flags (guard mode); ``defaults``
    turns a method's given settings into the ones it runs with (e.g. over a model's calibrated ones)."""
    if not measures:
        raise DiffmemError("give at least one similarity measure (a training-set index)")
    if quality is not None and control_group not in groups:
        raise DiffmemError(
            f"quality is measured on the control group; {control_group!r} is not among the groups"
        )
    results = []
    for text in methods:
        method, settings = parse_method_spec(text)
        if defaults is not None:
            settings = defaults(method, settings)
        if method in NEEDS_REFERENCE and reference is None:
            raise DiffmemError(f"{method} needs a training-set index to guide against")
        if method in TAKES_REFERENCE:
            settings = {**settings, "reference": reference}
        config = mitigation_config(method, **settings)
        name = text if guard is None else f"guard+{text}"
        tables, summaries, images_by_group, aligned = [], {}, {}, {}
        seconds = evaluations = images = guided = 0
        for group, prompts in groups.items():
            synchronize(denoiser.device)
            started = time.perf_counter()
            result = mitigated_generate(
                denoiser,
                list(prompts),
                method,
                config,
                n_generations=n_generations,
                base_seed=base_seed,
                batch_size=batch_size,
                sampling=sampling,
                guard=guard,
                progress=progress,
            )
            synchronize(denoiser.device)
            seconds += time.perf_counter() - started
            evaluations += result.unet_evaluations
            images += len(result.seeds)
            guided += sum(steps > 0 for steps in result.guided_steps)
            table = result.to_table().append_column("group", pa.array([group] * len(result.seeds)))
            summaries[group] = {}
            for measure in measures:
                values = measure.values(result.images)
                summaries[group][measure.name] = measure.summary(values)
                table = table.append_column(measure.name, pa.array(values, pa.float64()))
            tables.append(table.append_column("mitigation", pa.array([name] * len(result.seeds))))
            images_by_group[group] = result.images
            if alignment is not None:
                scores = alignment(result.images, [str(p) for p in result.items])
                aligned[group] = float(scores.mean())
                tables[-1] = tables[-1].append_column("alignment", pa.array(scores.tolist(), pa.float64()))
        fid_value = kid_value = None
        if quality is not None:
            fake = images_by_group[control_group]
            fid_value = fid(quality.real, fake, quality.feature_net)
            kid_value = kid(
                quality.real,
                fake,
                quality.feature_net,
                min(quality.kid_subset_size, len(fake), len(quality.real)),
            )
        results.append(
            MitigationEvaluation(
                name=name,
                method=method,
                settings={k: v for k, v in settings.items() if k != "reference"},
                summaries=summaries,
                fid=fid_value,
                kid=kid_value,
                alignment=aligned or None,
                seconds_per_image=seconds / images,
                unet_evaluations_per_image=evaluations / images,
                guided_share=guided / images,
                rows=pa.concat_tables(tables, promote_options="default"),
            )
        )
    return results


def results_markdown(results: Sequence[MitigationEvaluation]) -> str:
    """The AMG-paper table: per group and measure Top 5% / Top 1 / share memorized; FID, KID, cost."""
    groups = list(results[0].summaries)
    measures = list(results[0].summaries[groups[0]])
    header = ["method"]
    for group in groups:
        for measure in measures:
            threshold = results[0].summaries[group][measure].threshold
            side = "<" if measure == "nl2" else ">"
            header += [
                f"{group} {measure} top 5%",
                f"{group} {measure} top 1",
                f"{group} {measure} {side}{threshold:g}",
            ]
    header += [
        "FID",
        "KID x1000",
        *(f"{g} alignment" for g in groups),
        "s / image",
        "UNet evals / image",
        "guided",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [f"`{result.name}`"]
        for group in groups:
            for measure in measures:
                s = result.summaries[group][measure]
                cells += [f"{s.top5_percent:.3f}", f"{s.top1:.3f}", f"{s.share_memorized:.2%}"]
        cells += [
            "–" if result.fid is None else f"{result.fid:.2f}",
            "–" if result.kid is None else f"{1000 * result.kid[0]:.2f} ± {1000 * result.kid[1]:.2f}",
            *("–" if result.alignment is None else f"{result.alignment[g]:.1%}" for g in groups),
            f"{result.seconds_per_image:.3f}",
            f"{result.unet_evaluations_per_image:.0f}",
            f"{result.guided_share:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

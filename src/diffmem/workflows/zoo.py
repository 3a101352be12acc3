"""The lab zoo: rebuild every lab (``diffmem lab zoo``) and judge every method at its defaults on each,
nothing tuned per lab (``diffmem eval zoo``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm, single_generation_scores
from diffmem.detect.registry import detector
from diffmem.errors import DiffmemError
from diffmem.explain.evaluate import trigger_evaluation
from diffmem.explain.ordinary_significance import OrdinarySignificance
from diffmem.explain.token_significance import ATTRIBUTION_TARGETS, SignificanceConfig
from diffmem.io.atomic import write_atomic, write_json_atomic, write_parquet_atomic
from diffmem.lab.dataset import build_lab_dataset, load_lab_dataset
from diffmem.lab.label import LabelConfig, copied_scenes
from diffmem.lab.zoo import ZOO, ZooLab, zoo_lab, zoo_paths
from diffmem.metrics.roc import detection_metrics, flagged_share_interval
from diffmem.models.source import ModelSource
from diffmem.workflows.calibrate import model_profile
from diffmem.workflows.evaluate import MitigationEvalConfig, evaluate_mitigation, read_labels
from diffmem.workflows.explain import DEFAULT_ATTRIBUTION
from diffmem.workflows.index import IndexConfig, build_index
from diffmem.workflows.lab import (
    CopyDetectorTrainingConfig,
    LabelLabConfig,
    ReaderTrainingConfig,
    TrainLabConfig,
    label_lab,
    train_lab,
    train_lab_copy_detector,
    train_lab_reader,
)
from diffmem.workflows.ordinary_significance import ordinary_significance
from diffmem.workflows.runtime import Runtime

log = logging.getLogger(__name__)

LAB_COPY_THRESHOLD = 0.75  # a near-copy for the lab's copy detector (every lab's labels use it)
LABELLED_GROUPS = ("memorized", "duplicated_image", "heldout")  # the prompts the zoo judges methods on
LABELLED_PER_GROUP = 64  # at most this many prompts of each group are labelled
TRUTH = "memorized_copy"  # most generations are near-copies by the lab's copy detector
# trigger_evaluation's columns averaged over the flagged memorized captions: for each attribution, and
# once (the carrying words' search does not depend on the attribution)
FLAGGED_MEASURES = ("below_without_top", "below_without_random")
CARRYING_MEASURES = ("below_without_carrying", "below_without_random_as_many", "carrying_are_triggers")
# the other first-step detectors, each at its defaults beside the noise norm (generation agreement needs
# whole generations, several per prompt)
FIRST_STEP_DETECTORS = ("sharpness", "attention_entropy", "one_step")
MITIGATIONS = ("amg", "prompt_optimization")  # judged at their calibrated defaults against plain sampling


def _labs(names: list[str] | None) -> list[ZooLab]:
    return [zoo_lab(n) for n in names] if names else list(ZOO)


@dataclass(frozen=True)
class ZooLabParts:
    """Where one lab's model, dataset, labels, copy detector, copy index and attribute reader are."""

    lab: ZooLab
    model: str
    data: Path
    labels: Path
    copy_detector: Path
    index: Path
    reader: Path

    @classmethod
    def locate(cls, root: Path, lab: ZooLab) -> ZooLabParts:
        """The parts under ``root``; a shipped lab's model, detector and index are the package's, and so
        are its labels when they were made the zoo's way."""
        paths = zoo_paths(root, lab)
        labels = paths["labels"] / "labels.parquet"
        if lab.shipped is None:
            model, detector, index = str(paths["model"]), paths["copy_detector"], paths["index"]
        else:
            source = ModelSource.resolve(lab.shipped)
            model, (index, detector) = lab.shipped, source.reference
            if _labelled_the_zoo_way(source.labels):
                labels = source.labels
        return cls(lab, model, paths["data"], labels, detector, index, paths["reader"])


def _labelled_the_zoo_way(labels: Path | None) -> bool:
    """Whether shipped labels judge copies with the copy detector at the zoo's threshold."""
    if labels is None or not labels.with_suffix(".json").is_file():
        return False
    record = json.loads(labels.with_suffix(".json").read_text())
    return (
        record["config"].get("copy_threshold") == LAB_COPY_THRESHOLD and TRUTH in pq.read_schema(labels).names
    )


def build_zoo(
    root: Path, names: list[str] | None = None, runtime: Runtime | None = None
) -> list[ZooLabParts]:
    """Build each lab's dataset, train its model (unless shipped), copy detector and attribute reader,
    label its prompts and index its training set under ``root``; a part already there is kept, so an
    interrupted build continues when run again."""
    runtime = runtime or Runtime()
    built = []
    for lab in _labs(names):
        parts = ZooLabParts.locate(root, lab)
        log.info("zoo lab %s: %s", lab.name, lab.summary)
        if not parts.data.exists():
            build_lab_dataset(parts.data, lab.data)
        if lab.trained_by_zoo:
            _train(lab, parts, runtime)
        if not parts.labels.exists():
            _label(parts, runtime)
        if not parts.reader.exists():
            train_lab_reader(ReaderTrainingConfig(parts.data), runtime).save(parts.reader)
        built.append(parts)
    return built


def _label(parts: ZooLabParts, runtime: Runtime) -> None:
    """Label the zoo's prompt groups for the lab's model by its copy detector at the zoo's threshold."""
    labelling = LabelConfig(
        copy_threshold=LAB_COPY_THRESHOLD, groups=LABELLED_GROUPS, max_prompts_per_group=LABELLED_PER_GROUP
    )
    model = ModelSource.resolve(parts.model).directory
    config = LabelLabConfig(model, parts.data, labelling, parts.copy_detector)
    label_lab(config, parts.labels.parent, runtime)


def _train(lab: ZooLab, parts: ZooLabParts, runtime: Runtime) -> None:
    """The model, copy detector and copy index of a lab the package does not ship."""
    model = Path(parts.model)
    if not (model / "model_index.json").exists():
        recipe = TrainLabConfig(
            parts.data,
            "small",
            unet_steps=lab.unet_steps,
            text_layers=lab.text_layers,
            text_width=lab.text_width,
            prediction_type=lab.prediction_type,
            family=lab.family,
            image_size=lab.data.image_size,
            vae_channels=lab.vae_channels,
            vae_steps=lab.vae_steps,
            vae_from=None if lab.vae is None else ModelSource.resolve(lab.vae).directory,
        )
        train_lab(recipe, model, runtime)
    if not parts.copy_detector.exists():
        train_lab_copy_detector(CopyDetectorTrainingConfig(parts.data), runtime).save(parts.copy_detector)
    if not parts.index.exists():
        config = IndexConfig(data=parts.data, kind="embedding", encoder=parts.copy_detector)
        build_index(config, runtime).save(parts.index)


@dataclass(frozen=True)
class ZooEvalConfig:
    """The zoo to judge, and how much of each lab: every method runs at its defaults."""

    root: Path
    labs: list[str] | None = None  # default: every zoo lab
    max_prompts_per_group: int | None = 24  # memorized and held-out prompts generated per lab
    n_generations: int = 2
    explained_captions: int = 24  # memorized captions each explanation ranks
    heldout_seeds: int = 4  # each held-out caption's scores drawn for the false-positive rate
    # held-out captions the false-positive rate is measured on: the lab's own, topped up with fresh ones
    heldout_prompts: int = 500
    num_inference_steps: int = 50
    batch_size: int = 16


@dataclass(frozen=True)
class ZooTable:
    """One row per lab: detection, explanation and mitigation at their defaults."""

    rows: list[dict[str, Any]]
    record: dict[str, Any] = field(default_factory=dict)
    explanations: dict[str, pa.Table] = field(default_factory=dict)  # "LAB-ATTRIBUTION": one row a caption
    scores: dict[str, pa.Table] = field(default_factory=dict)  # "LAB": labelled prompts, "LAB-heldout": draws

    @property
    def markdown(self) -> str:
        """The table, one lab a column and one measure a row."""
        labs = [row["lab"] for row in self.rows]
        measures = [key for key in self.rows[0] if key != "lab"]
        lines = ["| measure | " + " | ".join(labs) + " |", "|---|" + "---|" * len(labs)]
        for key in measures:
            lines.append(f"| {key} | " + " | ".join(_cell(row.get(key)) for row in self.rows) + " |")
        return "\n".join(lines) + "\n"

    def save(self, out: Path) -> None:
        """Write ``zoo.md``, ``zoo.parquet`` and ``zoo.json`` into ``out``; each lab's explained captions,
        word by word, into ``out/explanations/LAB-ATTRIBUTION.parquet``; each labelled prompt's score by
        every first-step detector into ``out/scores/LAB.parquet``, and the held-out draws the
        false-positive rate is measured on into ``out/scores/LAB-heldout.parquet``."""
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "zoo.md", self.markdown.encode())
        write_parquet_atomic(pa.Table.from_pylist(self.rows), out / "zoo.parquet")
        write_json_atomic(out / "zoo.json", {"rows": self.rows, **self.record})
        (out / "explanations").mkdir(exist_ok=True)
        for name, table in self.explanations.items():
            write_parquet_atomic(table, out / "explanations" / f"{name}.parquet")
        (out / "scores").mkdir(exist_ok=True)
        for name, table in self.scores.items():
            write_parquet_atomic(table, out / "scores" / f"{name}.parquet")


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def evaluate_zoo(config: ZooEvalConfig, runtime: Runtime | None = None) -> ZooTable:
    """Every detector, explanation and mitigation at its defaults on every lab of the zoo."""
    runtime = runtime or Runtime()
    rows, explanations, scores = [], {}, {}
    for lab in _labs(config.labs):
        parts = ZooLabParts.locate(config.root, lab)
        missing = [
            p
            for p in (parts.data, parts.labels, parts.copy_detector, parts.index, parts.reader)
            if not p.exists()
        ]
        if missing:
            raise DiffmemError(
                f"zoo lab {lab.name} is not built ({missing[0]} is missing); run diffmem lab zoo {config.root}"
            )
        log.info("judging zoo lab %s", lab.name)
        row, tables, scored = _judge(parts, config, runtime)
        rows.append({"lab": lab.name, "differs_in": lab.summary, **row})
        explanations |= {f"{lab.name}-{target}": table for target, table in tables.items()}
        scores |= {f"{lab.name}{suffix}": table for suffix, table in scored.items()}
    settings = {k: v for k, v in vars(config).items() if k not in ("root", "labs")}
    return ZooTable(rows, {"settings": settings, **runtime.describe()}, explanations, scores)


def _judge(
    parts: ZooLabParts, config: ZooEvalConfig, runtime: Runtime
) -> tuple[dict[str, Any], dict[str, pa.Table], dict[str, pa.Table]]:
    """The lab's row of the table, its explained captions by attribution, and its scored prompts (the
    labelled ones under "", the held-out draws under "-heldout")."""
    source = ModelSource.resolve(parts.model)
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    labels = read_labels(parts.labels, ["caption", TRUTH, "group", "trigger_words"])
    prompts = labels["caption"].to_pylist()
    scores = noise_norm(denoiser, prompts, NoiseNormConfig(base_seed=runtime.seed)).scores.numpy()
    truth = np.asarray(labels[TRUTH].to_pylist(), dtype=bool)
    trained = np.asarray(pc.equal(labels["group"], "memorized").to_pylist(), dtype=bool)
    profile = model_profile(source, runtime, denoiser, parts.index, parts.copy_detector)
    threshold = profile.detection_threshold
    heldout_captions, fresh, heldout = _heldout_scores(
        denoiser, parts, labels, config.heldout_seeds, runtime.seed, config.heldout_prompts
    )
    flagged = heldout > threshold
    fpr_low, fpr_high = flagged_share_interval(flagged, seed=runtime.seed)
    row: dict[str, Any] = {
        "auc": detection_metrics(scores, truth)["auc"],
        "auc_memorized_group": detection_metrics(scores, trained)["auc"],
        "threshold": threshold,
        "heldout_fpr": float(flagged.mean()),
        "heldout_fpr_low": fpr_low,  # its 95% interval, resampling held-out captions
        "heldout_fpr_high": fpr_high,
        "heldout_prompts": len(heldout_captions),
        "heldout_fresh_prompts": int(fresh.sum()),
        "heldout_scores": heldout.size,
        "memorized_tpr": float((scores[truth] > threshold).mean()),
    }
    sources, own = _copy_sources(parts.labels, labels, scores, truth)
    others, other_scores = _other_detectors(denoiser, prompts, truth, runtime.seed)
    ordinary = ordinary_significance(
        source, SignificanceConfig(attribute_to="word_replacement"), runtime, denoiser, parts.index
    )
    explained, tables = _explanations(denoiser, labels, truth, threshold, config, ordinary)
    row |= sources | others | explained | _mitigations(parts, config, runtime)
    scored = {
        "": _scored_prompts(labels, truth, own, {"noise_norm": scores.tolist(), **other_scores}),
        "-heldout": pa.table({"caption": heldout_captions, "fresh": fresh, "scores": heldout.tolist()}),
    }
    return row, tables, scored


def _scored_prompts(
    labels: pa.Table, truth: np.ndarray, own: np.ndarray | None, scores: dict[str, list[float | None]]
) -> pa.Table:
    """Each labelled prompt with its group, truth, whether it copies its own image (null when unknown) and
    its score by each detector."""
    own_image = own.tolist() if own is not None else [None] * len(labels)
    columns = {"caption": labels["caption"], "group": labels["group"], TRUTH: truth.tolist()}
    return pa.table({**columns, "own_image_copy": pa.array(own_image, pa.bool_()), **scores})


def _heldout_scores(
    denoiser, parts: ZooLabParts, labels: pa.Table, seeds: int, seed: int, prompts: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """:func:`heldout_captions`, whether each is fresh [P], and their single-generation scores at
    ``seeds`` seeds [P, seeds]: the draws a scan's false-positive rate is measured on."""
    captions, fresh = heldout_captions(parts, labels, prompts, seed)
    scores = single_generation_scores(denoiser, captions, NoiseNormConfig(base_seed=seed), seeds).numpy()
    return captions, fresh, scores


def heldout_captions(
    parts: ZooLabParts, labels: pa.Table, prompts: int, seed: int
) -> tuple[list[str], np.ndarray]:
    """Every held-out caption of the lab's dataset, less those ``labels`` call copies, then fresh ones
    drawn as the lab draws its own up to ``prompts`` (unlabelled: a fresh caption that copies counts as
    a false positive); and whether each is fresh [P]."""
    heldout = pc.equal(labels["group"], "heldout")
    copies = set(labels.filter(pc.and_(heldout, labels[TRUTH]))["caption"].to_pylist())
    own = pq.read_table(parts.data / "heldout.parquet", columns=["caption"])["caption"].to_pylist()
    own = [c for c in own if c not in copies]
    fresh = (
        load_lab_dataset(parts.data).fresh_heldout_prompts(prompts - len(own), seed)
        if len(own) < prompts
        else []
    )
    return own + fresh, np.arange(len(own) + len(fresh)) >= len(own)


def _copy_sources(
    path: Path, labels: pa.Table, scores: np.ndarray, truth: np.ndarray
) -> tuple[dict, np.ndarray | None]:
    """How many copies are of another image than the caption's own (a held-out caption has none) and the
    AUC on the copies of their own image against every non-copy, those others left out (none without
    both); with which prompts copy their own image. None when the labels' generations are not beside
    them."""
    generations = path.with_name("generations.parquet")
    if not generations.is_file() or not {"prompt_id", "scene_id"} <= set(labels.column_names):
        return {"other_image_copies": None, "auc_own_image_copies": None}, None
    copied = copied_scenes(pq.read_table(generations), LAB_COPY_THRESHOLD)
    own = truth & np.array(
        [
            group != "heldout" and copied.get(prompt) == scene
            for prompt, scene, group in zip(
                labels["prompt_id"].to_pylist(), labels["scene_id"].to_pylist(), labels["group"].to_pylist()
            )
        ]
    )
    kept = own | ~truth
    auc = detection_metrics(scores[kept], own[kept])["auc"] if own.any() and not own[kept].all() else None
    return {"other_image_copies": int((truth & ~own).sum()), "auc_own_image_copies": auc}, own


def _other_detectors(
    denoiser, prompts: list[str], truth: np.ndarray, seed: int
) -> tuple[dict, dict[str, list[float | None]]]:
    """The AUC of each other first-step detector at its defaults, and its score of each prompt (none
    where it does not support the model)."""
    row, scored = {}, {}
    for name in FIRST_STEP_DETECTORS:
        settings, detect = detector(name)
        try:
            scores = detect(denoiser, prompts, settings(base_seed=seed)).scores
        except DiffmemError as error:
            log.info("%s: %s", name, error)
            row[f"auc_{name}"], scored[name] = None, [None] * len(prompts)
            continue
        row[f"auc_{name}"] = detection_metrics(scores, truth)["auc"]
        scored[name] = np.asarray(scores, dtype=float).tolist()
    return row, scored


def _explanations(
    denoiser,
    labels: pa.Table,
    truth: np.ndarray,
    threshold: float,
    config: ZooEvalConfig,
    ordinary: OrdinarySignificance | None,
) -> tuple[dict, dict[str, pa.Table]]:
    """Per attribution: the share of memorized captions whose top word is a trigger word; for each, the
    share of flagged captions that replacing the top word (or a random word) takes under the threshold;
    once, the share that the words carrying them (or as many random words) take under, and whose carrying
    words are all trigger words. Also each attribution's table of explained captions. Word replacement
    weighs words beyond their ``ordinary`` significance, as ``diffmem explain`` does."""
    memorized = labels.filter(
        pa.array(truth & np.asarray(pc.equal(labels["group"], "memorized").to_pylist()))
    )
    memorized = memorized.slice(0, config.explained_captions)
    prompts, triggers = memorized["caption"].to_pylist(), memorized["trigger_words"].to_pylist()
    row, tables = {}, {}
    for target in ATTRIBUTION_TARGETS:
        default = target == DEFAULT_ATTRIBUTION
        config = SignificanceConfig(attribute_to=target)
        against = ordinary if target == "word_replacement" else None
        table = trigger_evaluation(
            denoiser, prompts, triggers, threshold, config, carrying=default, ordinary=against
        )
        tables[target] = table
        row[f"top_is_trigger_{target}"] = float(np.mean(table["top_is_trigger"].to_pylist()))
        flagged = table.filter(table["flagged"])
        if len(flagged):
            for column in FLAGGED_MEASURES:
                row[f"{column}_{target}"] = float(np.mean(flagged[column].to_pylist()))
            for column in CARRYING_MEASURES if default else ():
                row[column] = float(np.mean(flagged[column].to_pylist()))
    return row, tables


def _mitigations(parts: ZooLabParts, config: ZooEvalConfig, runtime: Runtime) -> dict:
    """Copies of memorized prompts plainly and with each mitigation at its defaults, and what each costs
    held-out prompts: FID against their real scenes (ratio to plain) and text alignment (points)."""
    report = evaluate_mitigation(
        MitigationEvalConfig(
            model=parts.model,
            labels=parts.labels,
            indexes=[parts.index],
            encoder=parts.copy_detector,
            methods=["none", *MITIGATIONS],
            max_prompts_per_group=config.max_prompts_per_group,
            copy_threshold=LAB_COPY_THRESHOLD,
            data=parts.data,
            reader=parts.reader,
            n_generations=config.n_generations,
            num_inference_steps=config.num_inference_steps,
            batch_size=config.batch_size,
        ),
        runtime,
    )
    results = {r.method: r for r in report.results}
    plain = results["none"]
    row = {"copies_plain": _copies(plain), "alignment_plain": 100 * plain.alignment["heldout"]}
    for method in MITIGATIONS:
        result = results[method]
        row[f"copies_{method}"] = _copies(result)
        row[f"fid_ratio_{method}"] = result.fid / plain.fid
        row[f"alignment_change_{method}"] = 100 * (result.alignment["heldout"] - plain.alignment["heldout"])
    return row


def _copies(result) -> float:
    return result.summaries["memorized"]["copy_similarity"].share_memorized

"""Ground-truth memorization labels for a lab model: generate several images per prompt, find each one's
nearest training image, and call a prompt memorized when most of its generations are near-copies."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from diffmem.adapters import DiffusersDenoiser
from diffmem.errors import DiffmemError
from diffmem.io.run_record import environment
from diffmem.lab.dataset import LabDataset
from diffmem.metrics.copy_detection import COPY_THRESHOLD, embed, max_similarity
from diffmem.metrics.memorization import per_prompt, summarize
from diffmem.metrics.nl2 import NL2_ALPHA, NL2_K, NL2_THRESHOLD, nl2
from diffmem.models.source import model_hash
from diffmem.sampling import generate

GROUPS = ("memorized", "duplicated_image", "unique", "heldout")


@dataclass(frozen=True)
class LabelConfig:
    """How labels are made (defaults: 8 seeds per prompt, DDIM 50 steps, CFG 7.5)."""

    n_generations: int = 8
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 64
    majority: float = 0.5  # memorized when more than this share of generations are near-copies
    copy_threshold: float = COPY_THRESHOLD  # near-copy above this similarity (SSCD: 0.5; the lab: 0.75)
    groups: tuple[str, ...] = GROUPS
    max_prompts_per_group: int | None = None
    seed: int = 0


def lab_prompts(dataset: LabDataset, groups: tuple[str, ...] = GROUPS, limit: int | None = None) -> pa.Table:
    """Distinct captions of the chosen groups with their scene and trigger words; ``prompt_id`` is stable."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise DiffmemError(f"unknown prompt groups {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    heldout = dataset.heldout.select(["scene_id", "caption"])
    heldout = heldout.append_column("group", pa.array(["heldout"] * len(heldout), pa.string()))
    heldout = heldout.append_column("trigger_words", pa.array([[]] * len(heldout), pa.list_(pa.string())))
    columns = ["scene_id", "caption", "group", "trigger_words"]
    table = pa.concat_tables([dataset.train.select(columns), heldout.select(columns)])
    rows, seen = [], set()
    for group in GROUPS:  # a fixed order, so prompt ids do not depend on the groups chosen
        part = table.filter(pc.equal(table["group"], group)).sort_by(
            [("scene_id", "ascending"), ("caption", "ascending")]
        )
        kept = 0
        for row in part.to_pylist():
            if row["caption"] in seen:
                continue
            seen.add(row["caption"])
            row["prompt_id"] = len(seen) - 1
            if group in groups and (limit is None or kept < limit):
                rows.append(row)
                kept += 1
    return pa.Table.from_pylist(rows)


def label_lab_model(
    denoiser: DiffusersDenoiser,
    model_dir: Path,
    dataset: LabDataset,
    config: LabelConfig = LabelConfig(),
    copy_encoder: torch.nn.Module | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Label the lab's prompts for ``denoiser`` and write ``labels.parquet``, ``generations.parquet`` and
    ``labels.json`` (provenance) to ``out_dir`` (default ``model_dir/labels``)."""
    out_dir = Path(out_dir or Path(model_dir) / "labels")
    prompts = lab_prompts(dataset, config.groups, config.max_prompts_per_group)
    scene_ids, references = dataset.unique_train_images()
    reference_embeddings = None if copy_encoder is None else embed(copy_encoder, references)
    generation_rows = []
    batches = range(0, len(prompts), config.batch_size)
    for start in tqdm(batches, desc="labelling", disable=not progress):
        chunk = prompts.slice(start, config.batch_size)
        result = generate(
            denoiser,
            chunk.column("caption").to_pylist(),
            prompt_ids=chunk.column("prompt_id").to_pylist(),
            n_generations=config.n_generations,
            base_seed=config.seed,
            batch_size=config.batch_size,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
        )
        images = result.images.float()
        pixel = nl2(images, references)
        rows = {
            **result.to_table().drop_columns(["prompt"]).to_pydict(),
            "nl2": pixel.nl2.tolist(),
            "nl2_nearest_scene_id": [scene_ids[i] for i in pixel.nearest_index.tolist()],
        }
        if reference_embeddings is not None:
            similarity, nearest = max_similarity(embed(copy_encoder, images), reference_embeddings)
            rows["copy_similarity"] = similarity.tolist()
            rows["copy_nearest_scene_id"] = [scene_ids[i] for i in nearest.tolist()]
        generation_rows.append(pa.table(rows))
    generations = pa.concat_tables(generation_rows)
    labels = _prompt_labels(prompts, generations, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(generations, out_dir / "generations.parquet")
    pq.write_table(labels, out_dir / "labels.parquet")
    provenance = {
        "model_hash": model_hash(Path(model_dir)),
        "dataset": str(dataset.directory),
        "config": asdict(config),
        "sampler": type(denoiser.scheduler).__name__,
        "thresholds": {
            "nl2": NL2_THRESHOLD,
            "nl2_k": NL2_K,
            "nl2_alpha": NL2_ALPHA,
            "copy": config.copy_threshold,
        },
        "summary": _summary(labels, generations),
        "environment": environment(),
    }
    (out_dir / "labels.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return out_dir


def _prompt_labels(prompts: pa.Table, generations: pa.Table, config: LabelConfig) -> pa.Table:
    """Per prompt: share of near-copies by nL2 and the memorized label by nL2 (and both by copy detection)."""
    ids, majority = generations["prompt_id"].to_numpy(), config.majority
    by_nl2 = per_prompt(generations["nl2"].to_numpy(), ids, NL2_THRESHOLD, False, majority)
    names = {
        "n_generations": "n_generations",
        "share_memorized": "share_nl2",
        "top1": "min_nl2",
        "memorized": "memorized",
    }
    labels = _attach(prompts, by_nl2, names)
    if "copy_similarity" in generations.column_names:
        copy = generations["copy_similarity"].to_numpy()
        by_copy = per_prompt(copy, ids, config.copy_threshold, True, majority)
        names = {
            "share_memorized": "share_copy",
            "top1": "max_copy_similarity",
            "memorized": "memorized_copy",
        }
        labels = _attach(labels, by_copy, names)
    own = _share_own_scene(prompts, generations)
    labels = labels.append_column("share_own_scene", pa.array(own, pa.float64()))
    in_group = pc.equal(labels["group"], "memorized")
    return labels.append_column("memorized_group", in_group)


def _share_own_scene(prompts: pa.Table, generations: pa.Table) -> list[float]:
    """Per prompt: share of its generations whose nL2-nearest training image is the prompt's own scene
    (the lab knows which image a training caption came with; held-out scenes are in no training set)."""
    scene = dict(zip(prompts["prompt_id"].to_pylist(), prompts["scene_id"].to_pylist()))
    hits: dict[int, list[bool]] = {}
    for prompt_id, nearest in zip(
        generations["prompt_id"].to_pylist(), generations["nl2_nearest_scene_id"].to_pylist()
    ):
        hits.setdefault(prompt_id, []).append(nearest == scene[prompt_id])
    return [sum(hits[p]) / len(hits[p]) for p in prompts["prompt_id"].to_pylist()]


def copied_scenes(generations: pa.Table, threshold: float) -> dict[int, int]:
    """Per prompt with near-copies among its generations (copy similarity above ``threshold``): the
    training scene most of them copy (the lowest scene id on a tie)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for prompt_id, similarity, scene in zip(
        generations["prompt_id"].to_pylist(),
        generations["copy_similarity"].to_pylist(),
        generations["copy_nearest_scene_id"].to_pylist(),
    ):
        if similarity > threshold:
            counts[prompt_id][scene] += 1
    return {p: min(c, key=lambda scene: (-c[scene], scene)) for p, c in counts.items()}


def _attach(prompts: pa.Table, per_prompt_table: pa.Table, names: dict[str, str]) -> pa.Table:
    """Columns of a per-prompt table appended to ``prompts``, matched on ``prompt_id``."""
    order = pc.index_in(prompts["prompt_id"], value_set=per_prompt_table["prompt_id"])
    for source, name in names.items():
        prompts = prompts.append_column(name, per_prompt_table[source].take(order))
    return prompts


def _share(flags: pa.ChunkedArray) -> float:
    return float(pc.mean(flags.cast(pa.float64())).as_py())


def _summary(labels: pa.Table, generations: pa.Table) -> dict:
    """Share of prompts labelled memorized per group (by nL2, and by copy detection when measured), and
    nL2 summaries over all generations."""
    groups = {}
    for group in sorted(set(labels.column("group").to_pylist())):
        part = labels.filter(pc.equal(labels["group"], group))
        groups[group] = {"prompts": len(part), "share_memorized": _share(part["memorized"])}
        if "memorized_copy" in part.column_names:
            groups[group]["share_memorized_copy"] = _share(part["memorized_copy"])
    return {"groups": groups, "nl2": summarize(generations["nl2"].to_numpy(), NL2_THRESHOLD, False).to_dict()}

"""Scan a prompt list with a detector into a scan directory, resumably: one row per prompt."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from diffmem.core.denoiser import Denoiser
from diffmem.detect.detector import DetectionResult
from diffmem.detect.scan_store import SCHEMA, ScanStore
from diffmem.detect.scanner import Scanner
from diffmem.io.prompts import PromptRecord
from diffmem.models.spec import ModelSpec
from diffmem.models.speedups import Speedups, apply_speedups
from diffmem.text.prompt_tokens import token_counts

Loader = Callable[[str | ModelSpec, str, torch.dtype], Denoiser]  # (model, device, dtype) -> a denoiser


@dataclass(frozen=True)
class ScanJob:
    """What a scan engine's workers need to build the scanner themselves: the model and the detector."""

    model: str | ModelSpec
    device: str
    dtype: torch.dtype
    detector: str
    config: Any
    threshold: float | None
    model_hash: str
    speedups: Speedups | None = None

    def scanner(self, load: Loader, device: str) -> Scanner:
        """A scanner for this job on ``device``; ``load(model, device, dtype)`` opens the denoiser."""
        denoiser = apply_speedups(load(self.model, device, self.dtype), self.speedups)
        return Scanner(denoiser, self.detector, self.config, self.threshold)


def scan_prompts(
    scanner: Scanner,
    records: Sequence[PromptRecord],
    store: ScanStore,
    model_hash: str,
    chunk_size: int = 256,
    progress: bool = True,
) -> tuple[pa.Table, dict]:
    """Score every record not yet committed in ``store``, commit rows chunk by chunk, and return the
    merged table (one row per record, in input order) with a summary of the whole scan."""
    unscorable, chunks = pending_chunks(records, store, chunk_size)
    store.commit(score_records(scanner, unscorable, model_hash))
    scored = sum(len(chunk) for chunk in chunks)
    started = time.perf_counter()
    bar = tqdm(total=len(records), initial=len(records) - scored, unit="prompt", disable=not progress)
    with bar:
        for chunk in chunks:
            store.commit(score_records(scanner, chunk, model_hash))
            bar.update(len(chunk))
    wall = time.perf_counter() - started
    table = store.merge([r.prompt_id for r in records])
    return table, scan_summary(table, scanner.threshold, scored, wall, scanner.batch_size, scanner.halvings)


def pending_chunks(
    records: Sequence[PromptRecord], store: ScanStore, chunk_size: int
) -> tuple[list[PromptRecord], list[list[PromptRecord]]]:
    """The records not committed yet: those that cannot be scored, and the scorable ones in chunks."""
    done = store.done_ids()
    todo = [r for r in records if r.prompt_id not in done]
    scorable = [r for r in todo if r.status == "ok"]
    chunks = [scorable[start : start + chunk_size] for start in range(0, len(scorable), chunk_size)]
    return [r for r in todo if r.status != "ok"], chunks


def score_records(scanner: Scanner, records: Sequence[PromptRecord], model_hash: str) -> pa.Table:
    """One scan row per record: scored when its status is "ok", else kept with its status and no score.
    The one scoring function of every scan engine (local, Ray actors, accelerate processes)."""
    scorable = [r for r in records if r.status == "ok"]
    result = None
    if scorable:
        result = scanner.update([r.prompt for r in scorable], [r.prompt_id for r in scorable])
    scores = dict(zip([r.prompt_id for r in scorable], _scored(result), strict=True))
    return _rows(records, scanner, model_hash, scores)


def _scored(result: DetectionResult | None) -> list[tuple[float, list[int]]]:
    if result is None:
        return []
    return [(float(score), seeds.tolist()) for score, seeds in zip(result.scores, result.seeds, strict=True)]


def _rows(
    records: Sequence[PromptRecord],
    scanner: Scanner,
    model_hash: str,
    scores: dict[int, tuple[float, list[int]]],
) -> pa.Table:
    config = scanner.config
    counts = token_counts(scanner.denoiser, [r.prompt for r in records]) if records else None
    rows = []
    for i, record in enumerate(records):
        score, seeds = scores.get(record.prompt_id, (None, None))
        status = record.status if score is None or math.isfinite(score) else "nonfinite"
        flagged = None
        if scanner.threshold is not None and status == "ok":
            flagged = score > scanner.threshold
        rows.append(
            {
                "prompt_id": record.prompt_id,
                "prompt": record.prompt,
                "status": status,
                "score": score,
                "flagged": flagged,
                "tokens": None if counts is None else counts.counts[i],
                "truncated": None if counts is None else counts.truncated[i],
                "seeds": seeds,
                "num_inference_steps": getattr(config, "num_inference_steps", None),
                "scored_steps": _scored_steps(config),
                "generations": getattr(config, "n_generations", None),
                "detector": scanner.detector,
                "model_hash": model_hash,
            }
        )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _scored_steps(config: object) -> int | None:
    steps = getattr(config, "steps", None)
    return getattr(config, "num_inference_steps", None) if steps is None else steps


def scan_summary(
    table: pa.Table,
    threshold: float | None,
    scored_now: int,
    wall_s: float,
    batch_size: int,
    halvings: Sequence[tuple[int, int]] | None,
) -> dict:
    """The summary of a finished scan; ``halvings`` is None when the engine does not collect them."""
    status = Counter(table["status"].to_pylist())
    flagged = table["flagged"].to_pylist()
    truncated = table["truncated"].to_pylist()
    return {
        "prompts": table.num_rows,
        "status": dict(status),
        "scored": status["ok"],
        "unscored": {name: count for name, count in status.items() if name != "ok"},  # why, how many
        "flagged": sum(f is True for f in flagged) if threshold is not None else None,
        "threshold": threshold,
        "truncated": sum(t is True for t in truncated),
        "scored_this_run": scored_now,
        "wall_s_this_run": round(wall_s, 3),
        "prompts_per_s_this_run": round(scored_now / wall_s, 3) if wall_s > 0 and scored_now else None,
        "batch_size": batch_size,
        "out_of_memory_halvings": None if halvings is None else [{"from": a, "to": b} for a, b in halvings],
    }

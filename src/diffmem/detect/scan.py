"""Scan a prompt list with a detector into a scan directory, resumably: one row per prompt."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa
from tqdm.auto import tqdm

from diffmem.detect.detector import DetectionResult
from diffmem.detect.scan_store import SCHEMA, ScanStore
from diffmem.detect.scanner import Scanner
from diffmem.prompt_tokens import token_counts
from diffmem.prompts_io import PromptRecord


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
    done = store.done_ids()
    todo = [r for r in records if r.prompt_id not in done]
    unscorable = [r for r in todo if r.status != "ok"]
    store.commit(_rows(unscorable, scanner, model_hash))
    scorable = [r for r in todo if r.status == "ok"]
    started = time.perf_counter()
    bar = tqdm(total=len(records), initial=len(records) - len(scorable), unit="prompt", disable=not progress)
    with bar:
        for start in range(0, len(scorable), chunk_size):
            chunk = scorable[start : start + chunk_size]
            result = scanner.update([r.prompt for r in chunk], [r.prompt_id for r in chunk])
            store.commit(_rows(chunk, scanner, model_hash, result))
            bar.update(len(chunk))
    wall = time.perf_counter() - started
    table = store.merge([r.prompt_id for r in records])
    return table, _summary(table, scanner, len(scorable), wall)


def _rows(
    records: Sequence[PromptRecord], scanner: Scanner, model_hash: str, result: DetectionResult | None = None
) -> pa.Table:
    config = scanner.config
    counts = token_counts(scanner.denoiser, [r.prompt for r in records]) if records else None
    rows = []
    for i, record in enumerate(records):
        score = None if result is None else float(result.scores[i])
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
                "seeds": None if result is None else result.seeds[i].tolist(),
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


def _summary(table: pa.Table, scanner: Scanner, scored_now: int, wall_s: float) -> dict:
    status = Counter(table["status"].to_pylist())
    flagged = table["flagged"].to_pylist()
    truncated = table["truncated"].to_pylist()
    return {
        "prompts": table.num_rows,
        "status": dict(status),
        "flagged": sum(f is True for f in flagged) if scanner.threshold is not None else None,
        "threshold": scanner.threshold,
        "truncated": sum(t is True for t in truncated),
        "scored_this_run": scored_now,
        "wall_s_this_run": round(wall_s, 3),
        "prompts_per_s_this_run": round(scored_now / wall_s, 3) if wall_s > 0 and scored_now else None,
        "batch_size": scanner.batch_size,
        "out_of_memory_halvings": [{"from": a, "to": b} for a, b in scanner.halvings],
    }

"""A scan over the processes of ``accelerate launch`` (or ``torchrun``): one model per device, the pending
chunks dealt out round-robin, every process committing its own part files to one scan directory."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from diffmem.detect.scan import Loader, ScanJob, pending_chunks, scan_summary, score_records
from diffmem.detect.scan_store import ScanStore
from diffmem.io.prompts import PromptRecord


def distributed_scan_prompts(
    job: ScanJob,
    load: Loader,
    records: Sequence[PromptRecord],
    out_dir: Path,
    settings: dict[str, Any],
    mode: str = "new",
    chunk_size: int = 256,
    progress: bool = True,
) -> tuple[pa.Table, dict] | None:
    """Called by every process: each scores every N-th pending chunk (N processes) with the local scan's
    chunks and seeds, so the rows equal a local scan's. The main process returns the merged table and the
    summary; the others return None. A single process without a launcher scans everything itself."""
    state = PartialState(cpu=job.device == "cpu" or not torch.cuda.is_available())
    if state.is_main_process:
        store = ScanStore(out_dir, settings, mode, rank=state.process_index)
    state.wait_for_everyone()  # the directory exists and holds this scan's settings
    if not state.is_main_process:
        store = ScanStore(out_dir, settings, "resume", rank=state.process_index)
    unscorable, chunks = pending_chunks(records, store, chunk_size)
    state.wait_for_everyone()  # every process has read the same committed rows before any commit
    mine = chunks[state.process_index :: state.num_processes]
    scanner = job.scanner(load, "cpu" if state.device.type == "cpu" else str(state.device))
    if state.is_main_process:
        store.commit(score_records(scanner, unscorable, job.model_hash))
    started = time.perf_counter()
    bar = tqdm(total=sum(map(len, mine)), unit="prompt", disable=not (progress and state.is_main_process))
    with bar:
        for chunk in mine:
            store.commit(score_records(scanner, chunk, job.model_hash))
            bar.update(len(chunk))
    halvings = gather_object(scanner.halvings)
    state.wait_for_everyone()  # every process's rows are committed
    wall = time.perf_counter() - started
    if not state.is_main_process:
        return None
    table = store.merge([r.prompt_id for r in records])
    summary = scan_summary(table, job.threshold, sum(map(len, chunks)), wall, scanner.batch_size, halvings)
    return table, {**summary, "engine": "accelerate", "workers": state.num_processes}

"""A scan on Ray Data: the local scan's scoring function in a pool of actors that each load the model once,
rows streamed back and committed to the same resumable scan directory as they finish."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import diffusers
import pyarrow as pa
import torch
import transformers
from tqdm.auto import tqdm

from diffmem.detect.scan import Loader, ScanJob, pending_chunks, scan_summary, score_records
from diffmem.detect.scan_store import ScanStore
from diffmem.errors import DiffmemError
from diffmem.io.prompts import PromptRecord

FIELDS = ("prompt_id", "prompt", "status")  # a PromptRecord's, one list of each per chunk row


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray scan runs."""

    workers: int = 1  # actors, each holding one copy of the model
    cpus_per_worker: float = 1.0  # also the actor's torch threads
    gpus_per_worker: float = 0.0  # 1 on a GPU cluster: one model per GPU
    address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None starts a local one


class ScoringActor:
    """A Ray Data callable class: loads the model once, then turns batches of prompts into scan rows."""

    def __init__(self, job: ScanJob, load: Loader, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        diffusers.utils.logging.disable_progress_bar()  # the driver shows the scan's progress
        transformers.utils.logging.disable_progress_bar()
        self.job = job
        self.scanner = job.scanner(load, job.device)

    def __call__(self, chunks: pa.Table) -> pa.Table:
        """Scan rows for each chunk of the batch (a row of prompt lists), scored exactly as one local chunk."""
        tables = []
        for chunk in chunks.to_pylist():
            records = [PromptRecord(*fields) for fields in zip(*(chunk[k] for k in FIELDS), strict=True)]
            self.scanner.reset()
            tables.append(score_records(self.scanner, records, self.job.model_hash))
        return pa.concat_tables(tables)


def ray_scan_prompts(
    job: ScanJob,
    load: Loader,
    records: Sequence[PromptRecord],
    store: ScanStore,
    options: RayOptions,
    chunk_size: int = 256,
    progress: bool = True,
) -> tuple[pa.Table, dict]:
    """Score every record not yet committed in ``store`` on a Ray actor pool; chunks are the local scan's
    (same boundaries, same seeds), so the rows equal a local scan's."""
    ray, data = _import_ray()
    if options.workers < 1:
        raise DiffmemError(f"a Ray scan needs at least one worker; got {options.workers}")
    unscorable, chunks = pending_chunks(records, store, chunk_size)
    chunks = chunks + [unscorable] if unscorable else chunks
    scored = sum(r.status == "ok" for chunk in chunks for r in chunk)
    started = time.perf_counter()
    if chunks:
        if not ray.is_initialized():
            ray.init(address=options.address, include_dashboard=False, logging_level="ERROR")
        if options.address is None:
            _check_room(ray.cluster_resources(), options)
        context = data.DataContext.get_current()
        context.enable_progress_bars = False
        context.raise_original_map_exception = True  # a scoring error reaches the driver as itself
        rows = data.from_items([{k: [getattr(r, k) for r in chunk] for k in FIELDS} for chunk in chunks])
        rows = rows.map_batches(
            ScoringActor,
            batch_size=1,  # one chunk a call: the local scan's batches, so its floating-point results
            batch_format="pyarrow",
            udf_modifying_row_count=True,
            fn_constructor_kwargs={"job": job, "load": load, "threads": int(options.cpus_per_worker)},
            compute=data.ActorPoolStrategy(size=options.workers),
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker,
        )
        left = sum(len(chunk) for chunk in chunks)
        bar = tqdm(total=len(records), initial=len(records) - left, unit="prompt", disable=not progress)
        with bar:
            try:
                for batch in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
                    store.commit(batch)
                    bar.update(batch.num_rows)
            except ray.exceptions.RayError as error:
                raise DiffmemError(
                    f"the Ray scan stopped ({_gist(error)}); "
                    f"the rows of {len(store.done_ids())} prompts are saved, rerun with --resume"
                ) from error
    wall = time.perf_counter() - started
    table = store.merge([r.prompt_id for r in records])
    summary = scan_summary(table, job.threshold, scored, wall, int(job.config.batch_size), None)
    return table, {**summary, "engine": "ray", "workers": options.workers}


def _check_room(resources: dict, options: RayOptions) -> None:
    """Refuse a worker pool that a cluster of fixed size cannot hold (Ray would wait for it forever)."""
    for name, each in (("CPU", options.cpus_per_worker), ("GPU", options.gpus_per_worker)):
        have = resources.get(name, 0.0)
        if options.workers * each > have:
            raise DiffmemError(
                f"{options.workers} Ray workers need {options.workers * each:g} {name}s; this cluster has "
                f"{have:g}: pass fewer --workers"
            )


def _gist(error: BaseException) -> str:
    """The exception that started a Ray error, in one line."""
    while (inner := getattr(error, "cause", None) or error.__cause__) is not None:
        error = inner
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def _import_ray() -> tuple[Any, Any]:
    try:
        import ray
        import ray.data
        import ray.exceptions
    except ImportError as missing:
        raise DiffmemError('the Ray engine needs Ray Data: pip install "diffmem[ray]"') from missing
    return ray, ray.data

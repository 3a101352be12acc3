"""Build a training-set index, and fit AMG's gate to one: the Python side of ``diffmem index build`` and
``diffmem index gate``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffmem.data import RowReport
from diffmem.errors import DiffmemError
from diffmem.index import (
    TrainingSetIndex,
    clip_retrieval_source,
    image_source,
    index_embeddings,
    index_images,
)
from diffmem.index.build import describe_encoder
from diffmem.mitigate import SamplingOptions
from diffmem.mitigate.fitted_gate import FittedGate, fit_gate, similarity_trajectories
from diffmem.models.names import LAB_MODEL
from diffmem.models.source import ModelSource
from diffmem.models.spec import ModelSpec
from diffmem.workflows.inputs import conditioning_items, training_reference
from diffmem.workflows.runtime import Runtime


@dataclass(frozen=True)
class IndexConfig:
    """The training set to index: a lab dataset or any training set :mod:`diffmem.data` reads (``data``),
    or clip-retrieval output (``embeddings``)."""

    data: Path | None = None
    embeddings: Path | None = None
    kind: str | None = None  # pixels (nL2) or embedding (copy detection); default pixels, or embedding
    encoder: Path | None = None  # the copy-detection encoder (run for images; recorded for embeddings)
    exact: bool | None = None  # flat, or IVF-PQ re-ranked exactly; None: by size
    batch_size: int = 256
    caption_column: str | None = None  # default text, else caption (diffmem.data.read_training_data)

    def __post_init__(self) -> None:
        if (self.data is None) == (self.embeddings is None):
            raise DiffmemError("give either DATA (a lab dataset or your training images) or --embeddings DIR")
        if self.embeddings is not None and self.kind not in (None, "embedding"):
            raise DiffmemError(f"--embeddings builds an embedding index; drop --kind {self.kind}")


def build_index(config: IndexConfig, runtime: Runtime | None = None) -> TrainingSetIndex:
    """The index of the distinct training images with their captions (save it with ``.save(out)``)."""
    return _build(config, runtime or Runtime())[0]


@dataclass(frozen=True)
class SavedIndex:
    """An index written to ``directory``, and the report of the training rows read for it (None for a
    lab dataset and for embeddings)."""

    index: TrainingSetIndex
    directory: Path
    data_report: RowReport | None


def save_index(
    config: IndexConfig, out: Path, overwrite: bool = False, runtime: Runtime | None = None
) -> SavedIndex:
    """Build the index and write it to ``out``, with ``data_report.json`` beside it when rows were read."""
    index, report = _build(config, runtime or Runtime())
    index.save(out, overwrite=overwrite)
    if report is not None:
        report.save(Path(out) / "data_report.json")
    return SavedIndex(index, Path(out), report)


def _build(config: IndexConfig, runtime: Runtime) -> tuple[TrainingSetIndex, RowReport | None]:
    if config.embeddings is not None:
        described = None if config.encoder is None else describe_encoder(config.encoder)
        return index_embeddings(clip_retrieval_source(config.embeddings), config.exact, described), None
    source = image_source(config.data, config.caption_column)
    kind = config.kind or "pixels"
    built = index_images(source, kind, config.encoder, config.exact, runtime.device, config.batch_size)
    return built, source.data_report


@dataclass(frozen=True)
class GateConfig:
    """The index AMG guides against, the model, and the prompts known not to be memorized it is fitted on."""

    index: Path
    prompts: Path | None = None  # class numbers for a class-conditional model; none for an unconditional one
    model: str | ModelSpec = LAB_MODEL
    column: str = "prompt"
    encoder: Path | None = None  # an embedding index's encoder (default: the one it records)
    quantile: float = 0.9  # lambda_t is this quantile of the prompts' similarity at step t
    n_generations: int = 1
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:  # fit_gate checks it too, but only after minutes of sampling
            raise DiffmemError(f"--quantile must be between 0 and 1; got {self.quantile}")


def fit_index_gate(config: GateConfig, runtime: Runtime | None = None) -> FittedGate:
    """AMG's threshold schedule for this index: at each step, a quantile of the similarity that plain
    generations of the prompts reach (save it with ``.save(out)``; use it as ``amg:gate=FILE``)."""
    runtime = runtime or Runtime()
    source = ModelSource.resolve(config.model)
    reference = training_reference(config.index, config.encoder, runtime.device, source)
    denoiser = source.open(runtime.device, runtime.dtype, runtime.speedups)
    if config.prompts is None and denoiser.conditioning != "none":
        raise DiffmemError("give --prompts: prompts known not to be memorized, to fit the gate on")
    timesteps, sigmas = similarity_trajectories(
        denoiser,
        conditioning_items(denoiser.conditioning, [], config.prompts, config.column),
        reference,
        n_generations=config.n_generations,
        sampling=SamplingOptions(config.num_inference_steps, config.guidance_scale),
        base_seed=runtime.seed,
        batch_size=config.batch_size,
        progress=True,
    )
    return fit_gate(timesteps, sigmas, reference, config.quantile)

"""Build a training-set index, and fit AMG's gate to one: the Python side of ``diffmem index build`` and
``diffmem index gate``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from diffmem.workflows.inputs import conditioning_items, training_reference
from diffmem.workflows.runtime import Runtime


@dataclass(frozen=True)
class IndexConfig:
    """The training set to index: a lab dataset or image folder (``data``), or clip-retrieval output
    (``embeddings``)."""

    data: Path | None = None
    embeddings: Path | None = None
    kind: str | None = None  # pixels (nL2) or embedding (copy detection); default pixels, or embedding
    encoder: Path | None = None  # the copy-detection encoder (run for images; recorded for embeddings)
    exact: bool | None = None  # flat, or IVF-PQ re-ranked exactly; None: by size
    batch_size: int = 256

    def __post_init__(self) -> None:
        if (self.data is None) == (self.embeddings is None):
            raise DiffmemError("give either DATA (a lab dataset or an image folder) or --embeddings DIR")
        if self.embeddings is not None and self.kind not in (None, "embedding"):
            raise DiffmemError(f"--embeddings builds an embedding index; drop --kind {self.kind}")


def build_index(config: IndexConfig, runtime: Runtime | None = None) -> TrainingSetIndex:
    """The index of the distinct training images with their captions (save it with ``.save(out)``)."""
    runtime = runtime or Runtime()
    if config.embeddings is not None:
        described = None if config.encoder is None else describe_encoder(config.encoder)
        return index_embeddings(clip_retrieval_source(config.embeddings), config.exact, described)
    source = image_source(config.data)
    kind = config.kind or "pixels"
    return index_images(source, kind, config.encoder, config.exact, runtime.device, config.batch_size)


@dataclass(frozen=True)
class GateConfig:
    """The index AMG guides against, the model, and the prompts known not to be memorized it is fitted on."""

    index: Path
    prompts: Path | None = None  # class numbers for a class-conditional model; none for an unconditional one
    model: str = LAB_MODEL
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

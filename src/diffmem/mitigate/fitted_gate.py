"""An Anti-Memorization Guidance gate fitted to a copy detector: lambda_t is, at each sampling step, a
quantile of the similarity that plain generations of prompts known not to be memorized reach at that
step. A prompt that is itself a training caption is measured without its own training images: had it
not been trained on, that is the level its generation would reach, and a model that copies its
single-copy rows (as small training sets are copied) would otherwise lift the gate above its own
copies. The reference curves (SPEC §5) were drawn for SSCD on LAION and for nL2 on CIFAR-10; another
detector places unrelated images at another level, and a fitted gate opens for about ``1 - quantile``
of an ordinary prompt's steps whatever that level is."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from diffmem.core.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.io.atomic import write_json_atomic
from diffmem.mitigate.mitigation import SamplingOptions
from diffmem.mitigate.training_similarity import ReferenceSet, own_training_images, training_similarity
from diffmem.sampling import StepState, generate
from diffmem.sampling.seeds import generation_seed

FORMAT = "diffmem.amg_gate"


@dataclass(frozen=True)
class FittedGate:
    """lambda_t at the sampled timesteps (0..1000 scale, noisiest first), linear in t between them and
    constant beyond them, for the index it was fitted against."""

    timesteps: list[float]
    thresholds: list[float]
    quantile: float
    measure: str  # "copy_similarity" or "nl2": the similarity the thresholds are on
    index_fingerprint: str
    num_samples: int  # plain generations the quantiles were taken over
    own_images_left_out: bool = False  # each training caption measured without its own training images
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise DiffmemError(f"not an AMG gate file (format {self.format!r})")
        if not self.timesteps or len(self.timesteps) != len(self.thresholds):
            raise DiffmemError("a fitted gate needs one threshold per timestep")
        if not all(math.isfinite(v) for v in (*self.timesteps, *self.thresholds)):
            raise DiffmemError("a fitted gate's timesteps and thresholds must be finite")

    def __call__(self, t: float) -> float:
        """lambda_t at timestep ``t`` (0..1000 scale)."""
        return float(np.interp(t, *self._ascending))

    @cached_property
    def _ascending(self) -> tuple[np.ndarray, np.ndarray]:
        """Timesteps and thresholds in increasing t, as ``np.interp`` reads them (sorted once)."""
        order = np.argsort(self.timesteps)
        return np.asarray(self.timesteps)[order], np.asarray(self.thresholds)[order]

    @property
    def origin(self) -> float:
        """The gate at its noisiest step: where the dissimilarity strength starts, as 0.3 (the reference
        SSCD curve's level at pure noise) does for that curve."""
        return self(max(self.timesteps))

    @property
    def end(self) -> float:
        """The gate at its least noisy step: the similarity a finished ordinary image passes at about
        ``1 - quantile``."""
        return self(min(self.timesteps))

    def check(self, reference: ReferenceSet) -> None:
        """Raise unless ``reference`` is the index the gate was fitted against."""
        if reference.index.manifest.fingerprint != self.index_fingerprint:
            raise DiffmemError(
                "the AMG gate was fitted against another training-set index; fit it again for this one "
                "(diffmem index gate)"
            )

    def save(self, path: Path) -> None:
        """Write the gate as JSON (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> FittedGate:
        """Read a gate written by :meth:`save`."""
        try:
            return cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError as error:
            raise DiffmemError(f"AMG gate file not found: {path}") from error
        except (json.JSONDecodeError, TypeError) as error:
            raise DiffmemError(f"{path} is not an AMG gate file: {error}") from error


class SimilarityTrace:
    """Observer: sigma_t of every sample's decoded clean estimate at every step, as AMG measures it,
    over any number of batches sampled one after another; a sample whose seed ``exclude`` maps to index
    rows is measured without them."""

    def __init__(
        self, denoiser: Denoiser, reference: ReferenceSet, exclude: dict[int, torch.Tensor] | None = None
    ) -> None:
        self.denoiser = denoiser
        self.reference = reference
        self.exclude = exclude
        self.scale = 1000.0 / int(denoiser.scheduler.config.num_train_timesteps)
        self.timesteps: dict[int, float] = {}  # step index -> t (0..1000 scale)
        self.sigmas: dict[int, list[torch.Tensor]] = {}  # step index -> [B] per batch

    def __call__(self, step: StepState) -> None:
        with torch.no_grad():
            images = self.denoiser.decode(step.x0_hat.detach()).float()
            exclude = None if self.exclude is None else torch.stack([self.exclude[s] for s in step.seeds])
            sigma, _ = training_similarity(images, self.reference, exclude=exclude)
        self.timesteps[step.index] = float(step.t) * self.scale
        self.sigmas.setdefault(step.index, []).append(sigma.cpu())

    def trajectories(self) -> tuple[list[float], torch.Tensor]:
        """The timesteps in sampling order and sigma_t, [samples, steps], samples in sampling order."""
        steps = sorted(self.timesteps)
        return [self.timesteps[i] for i in steps], torch.stack([torch.cat(self.sigmas[i]) for i in steps], 1)


def similarity_trajectories(
    denoiser: Denoiser,
    prompts: Sequence,
    reference: ReferenceSet,
    *,
    n_generations: int = 1,
    sampling: SamplingOptions = SamplingOptions(),  # noqa: B008  (frozen)
    base_seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[float], torch.Tensor]:
    """The sampled timesteps (0..1000 scale) and sigma_t of plain sampling, [samples, steps], for the
    samples :func:`diffmem.sampling.generate` makes (same seeds and order); a prompt that is a training
    caption is measured without its own training images."""
    exclude = None
    if prompts and all(isinstance(p, str) for p in prompts):
        own = own_training_images(reference.index, prompts)
        exclude = {
            generation_seed(base_seed, i, g): own[i]
            for i in range(len(prompts))
            for g in range(n_generations)
        }
    trace = SimilarityTrace(denoiser, reference, exclude)
    generate(
        denoiser,
        prompts,
        n_generations=n_generations,
        base_seed=base_seed,
        batch_size=batch_size,
        decode=False,
        observers=[trace],
        **replace(sampling, progress=progress).sample_kwargs(),
    )
    return trace.trajectories()


def fit_gate(
    timesteps: Sequence[float], sigmas: torch.Tensor, reference: ReferenceSet, quantile: float
) -> FittedGate:
    """The gate at ``quantile`` of each step's similarities ([samples, steps], from prompts that are not
    memorized, as :func:`similarity_trajectories` measures them)."""
    if not 0 < quantile < 1:
        raise DiffmemError(f"the gate's quantile must be between 0 and 1; got {quantile}")
    finite = sigmas[sigmas.isfinite().all(1)]
    if len(finite) == 0:
        raise DiffmemError("no plain generation had a finite similarity at every step")
    thresholds = torch.quantile(finite.double(), quantile, dim=0)
    return FittedGate(
        timesteps=[float(t) for t in timesteps],
        thresholds=thresholds.tolist(),
        quantile=quantile,
        measure=reference.measure,
        index_fingerprint=reference.index.manifest.fingerprint,
        num_samples=len(finite),
        own_images_left_out=True,
    )

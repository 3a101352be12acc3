"""Anti-Memorization Guidance (Chen, Liu, Xu, CVPR 2024; SPEC §5): at every sampling step, compare the
clean estimate with its nearest training image and, when they are too similar, steer away with
despecification, caption-deduplication and dissimilarity guidance.

Similarity is measured against a training-set index (:mod:`diffmem.index`): pixel indexes give
``sigma_t = -nL2`` (eq. 8), embedding indexes ``sigma_t = <E(x0_hat), E(n0)>`` with the copy-detection
network E the index was built with (eq. 9). Guidance applies only while ``sigma_t > lambda_t`` (eq. 10),
per sample. Text-conditional models get all three terms, class-conditional ones despecification and
dissimilarity, unconditional ones dissimilarity only.

Flow-matching models (velocity predictions, ``diffmem.core.denoiser``) are guided as the
variance-preserving model with the same signal-to-noise ratio and the implied noise prediction
``eps = x_t + (1 - sigma_t) v``: despecification and deduplication scale differences of predictions, which
are the same in v as in eps up to that factor, so they apply to v as written; the dissimilarity step is
taken on that eps scale (eq. 17, the gradient with respect to the variance-preserving x'_t) and turned
into the velocity change that makes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from diffmem.core.denoiser import FLOW_PREDICTION, Denoiser, flow_sigma, x0_from_prediction
from diffmem.errors import DiffmemError
from diffmem.metrics.nl2 import NL2_K
from diffmem.mitigate.fitted_gate import FittedGate
from diffmem.mitigate.mitigation import OK, Mitigated, SamplingOptions, sampled
from diffmem.mitigate.training_similarity import ReferenceSet, training_similarity
from diffmem.sampling import StepState, sample
from diffmem.sampling.guided_sampler import predict_pair, resolve_guidance_scale

NONFINITE = "nonfinite"
TERMS = ("despecification", "deduplication", "dissimilarity")

# lambda_t on the 0..1000 training timestep scale: guidance applies while sigma_t > lambda_t
GATES: dict[str, Callable[[float], float]] = {
    "sscd": lambda t: 0.3 + 0.1 * math.exp(-0.005 * t),  # reference code, copy-detection similarity
    # reference code, CIFAR-10 nL2: guide while nL2 < 1.95 - 0.45 exp(-0.025 t'), t' over 250 respaced steps
    "nl2-cifar": lambda t: -(1.95 - 0.45 * math.exp(-0.025 * t * 250 / 1000)),
    "always": lambda t: -math.inf,  # the ablation without the gate (AMG Table 5)
    "never": lambda t: math.inf,  # measures the cost of watching alone
}


C3_RULES = ("reference", "excess")
# the excess rule's step in excesses: one excess (first order) left 67.5% of lab-keyed's memorized
# generations copies, three left none on either shipped lab (docs/calibrate.md)
EXCESS_OVERSHOOT = 3.0
SSCD_ORIGIN = 0.3  # the reference SSCD curve at t -> infinity: where its dissimilarity strength starts
PURE_NOISE = 1e-4  # a flow step with 1 - sigma_t at most this is at x_T: no dissimilarity step exists there


def reference_c3(sigma: torch.Tensor, t: float, origin: float = SSCD_ORIGIN) -> torch.Tensor:
    """The reference code's dissimilarity strength for copy-detection similarity (its 0.3 moved to
    ``origin`` with the gate)."""
    # c3 = 100 (sigma_t - 0.3) exp((1000 - t) / 170)   (SPEC §5.5, t on the 0..1000 scale)
    return 100.0 * (sigma - origin) * math.exp((1000.0 - t) / 170.0)


def excess_c3(excess: torch.Tensor, gradient: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The dissimilarity strength whose step lowers sigma_t by ``excess`` to first order (0 without a gradient).

    G_sim = c3 sqrt(1 - abar_t) g moves x0_hat by -(1 - abar_t) / sqrt(abar_t) c3 g, and sigma_t by about
    -(1 - abar_t) c3 |g|^2 (g = grad_{x_t} sigma_t ~ grad_{x0} sigma_t / sqrt(abar_t), the UNet's own
    dependence on x_t left out)."""
    squared = gradient.flatten(1).float().square().sum(dim=1)
    per_sample = alpha_bar_t.flatten().float().to(squared.device)
    denominator = (1 - per_sample) * squared
    c3 = excess.float().clamp_min(0.0) / denominator.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(squared > 0, c3, 0.0).to(excess.dtype)


def flow_input_scale(alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """r = sqrt((1 - sigma)^2 + sigma^2): a flow model's x_t is r times the variance-preserving x'_t of
    the same signal-to-noise ratio."""
    # x'_t = sqrt(abar) x0 + sqrt(1 - abar) eps = ((1 - sigma) x0 + sigma eps) / r
    return 1 / (alpha_bar_t.sqrt() + (1 - alpha_bar_t).sqrt())


def velocity_correction(eps_correction: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The change of a flow model's velocity that changes its implied noise prediction by
    ``eps_correction``; zero at pure noise (sigma = 1), where every velocity implies the noise x_T."""
    # eps = x_t + (1 - sigma) v at a fixed x_t  =>  dv = d_eps / (1 - sigma)
    signal = 1 - flow_sigma(alpha_bar_t)
    if float(signal) <= PURE_NOISE:
        return torch.zeros_like(eps_correction)
    return eps_correction / signal


@dataclass(frozen=True)
class AntiMemorizationConfig:
    """The reference defaults (SPEC §5); ``gate`` None picks the reference curve for the index's kind."""

    reference: ReferenceSet = field(compare=False)
    terms: tuple[str, ...] = TERMS
    # a name in GATES, or a gate file fitted to this index (diffmem index gate); None: "sscd" for
    # embeddings, "nl2-cifar" for pixels
    gate: str | None = None
    # added to lambda_t: for a similarity whose level between unrelated images differs from the one the
    # curve was made for (SSCD on LAION: memorized above 0.5); the lab's small copy detector needs ~0.25
    gate_shift: float = 0.0
    c1: float = 13.0  # despecification strength (eq. 13)
    min_caption_copies: int = 20  # deduplication only for captions with more training copies than this
    c3: float | None = None  # dissimilarity strength; None: reference_c3 (embeddings) or NL2_C3 (pixels)
    # multiplies the dissimilarity strength: a detector that separates copies less sharply than SSCD
    # moves a guided sample less per unit of similarity, and the copy it left can return in the last steps
    c3_scale: float = 1.0
    # "reference": c3 as the reference code sets it; "excess": the step whose first-order effect lowers
    # sigma_t by EXCESS_OVERSHOOT (x c3_scale) times its excess over lambda_t, whatever the scale of the
    # similarity's gradient
    c3_rule: str = "reference"
    # a sample whose gate has not opened yet is checked every check_every steps (from the first), one whose
    # gate has opened at every later step: at SD 1.5 size one decode costs more than the step's UNet pair
    check_every: int = 1
    # between those checks, a sample whose last sigma_t came within check_margin of lambda_t is checked at
    # the next step too: on the lab a copy can form within a few late steps
    check_margin: float = 0.05
    nl2_k: int = NL2_K

    def __post_init__(self) -> None:
        unknown = sorted(set(self.terms) - set(TERMS))
        if unknown or not self.terms:
            raise DiffmemError(f"AMG terms must be among {', '.join(TERMS)}; got {', '.join(self.terms)}")
        if self.gate is not None and self.gate not in GATES:
            if not Path(self.gate).suffix == ".json":
                raise DiffmemError(
                    f"unknown AMG gate {self.gate!r}; choose one of {', '.join(GATES)} or a fitted gate .json"
                )
            self.fitted_gate.check(self.reference)
        if self.c1 < 0 or (self.c3 is not None and self.c3 < 0) or self.min_caption_copies < 0:
            raise DiffmemError("AMG strengths c1, c3 and min_caption_copies must be non-negative")
        if not self.c3_scale > 0:
            raise DiffmemError(f"AMG c3_scale must be positive; got {self.c3_scale}")
        if self.c3_rule not in C3_RULES:
            raise DiffmemError(f"AMG c3_rule must be one of {', '.join(C3_RULES)}; got {self.c3_rule!r}")
        if not (isinstance(self.check_every, int) and self.check_every >= 1):
            raise DiffmemError(
                f"AMG check_every must be a whole number of steps >= 1; got {self.check_every!r}"
            )
        if not self.check_margin >= 0:
            raise DiffmemError(f"AMG check_margin must be non-negative; got {self.check_margin}")

    @cached_property
    def fitted_gate(self) -> FittedGate | None:
        """The gate file's curve, when ``gate`` names one."""
        return None if self.gate is None or self.gate in GATES else FittedGate.load(Path(self.gate))

    @property
    def lambda_t(self) -> Callable[[float], float]:
        """The gate curve in use."""
        curve = (
            self.fitted_gate
            or GATES[self.gate or ("sscd" if self.reference.index.kind == "embedding" else "nl2-cifar")]
        )
        return lambda t: curve(t) + self.gate_shift

    @property
    def c3_origin(self) -> float:
        """Where the reference dissimilarity strength starts: 0.3 for the preset curves, a fitted
        gate's noisiest threshold, each moved by ``gate_shift``."""
        return (SSCD_ORIGIN if self.fitted_gate is None else self.fitted_gate.origin) + self.gate_shift


NL2_C3 = 50.0  # diffmem's dissimilarity strength for sigma = -nL2 (the reference gives c3 only for SSCD)


class AntiMemorizationGuidance:
    """The AMG guidance term for one batch: returns ``1{sigma_t > lambda_t} (G_spe + G_dup + G_sim)``
    (eq. 10) and records, per sample, the steps guided, the highest similarity and its neighbour.

    The similarity is watched without gradients; only the samples whose gate opens are evaluated again
    with gradients for G_sim, so steps without guidance cost a decode and an index query. Until its gate
    first opens, a sample is checked only every ``check_every`` steps, and at the next step while its
    similarity is within ``check_margin`` of the gate; from then on at every step.
    """

    def __init__(self, denoiser: Denoiser, config: AntiMemorizationConfig, batch_size: int) -> None:
        self.denoiser = denoiser
        self.config = config
        self.index = config.reference.index
        self.train_timesteps = int(denoiser.scheduler.config.num_train_timesteps)
        self.guided_steps = [0] * batch_size
        self.status = [OK] * batch_size
        self.max_similarity = [-math.inf] * batch_size
        self.nearest_row = [-1] * batch_size  # index row of the neighbour at the most similar step
        self.checks = [0] * batch_size  # steps whose similarity was measured
        self.opened = torch.zeros(batch_size, dtype=torch.bool)  # whose gate has opened at some step
        self.near = torch.zeros(batch_size, dtype=torch.bool)  # within check_margin of it at the last check
        self.extra_evaluations = 0

    def __call__(self, step: StepState) -> torch.Tensor:
        due = self.opened | self.near | (step.index % self.config.check_every == 0)
        if not bool(due.any()):
            return torch.zeros_like(step.eps)
        sigma, nearest = self._similarity(step, due)
        t = float(step.t) * 1000.0 / self.train_timesteps
        active = torch.tensor([s == OK for s in self.status], device=sigma.device)
        lambda_t = self.config.lambda_t(t)
        gate = (sigma > lambda_t) & active & sigma.isfinite()  # NaN where not checked
        self.opened |= gate.cpu()
        self.near = ((sigma > lambda_t - self.config.check_margin) & active).cpu()  # False where not checked
        self._record(sigma, nearest)
        if not bool(gate.any()):
            return torch.zeros_like(step.eps)
        correction = self._guidance(step, sigma, nearest, gate, t, lambda_t)
        finite = correction.flatten(1).isfinite().all(1)
        for row in torch.nonzero(gate & ~finite).flatten().tolist():
            self.status[row] = NONFINITE  # guidance stops for this sample; its image is kept
            self.opened[row] = self.near[row] = False
        keep = (gate & finite).to(correction.dtype)[:, None, None, None]
        for row in torch.nonzero(gate & finite).flatten().tolist():
            self.guided_steps[row] += 1
        return torch.nan_to_num(correction) * keep

    @torch.no_grad()
    def _similarity(self, step: StepState, due: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma_t [B] and the nearest index row [B] of the samples due for a check (NaN and -1 elsewhere)."""
        rows = torch.nonzero(due).flatten().tolist()
        images = self.denoiser.decode(step.x0_hat[rows].detach()).float()
        checked, neighbours = training_similarity(images, self.config.reference, self.config.nl2_k)
        sigma = torch.full((len(due),), math.nan, device=checked.device)
        nearest = torch.full((len(due),), -1, dtype=torch.long, device=neighbours.device)
        sigma[rows], nearest[rows] = checked.float(), neighbours
        for row in rows:
            self.checks[row] += 1
        return sigma, nearest

    def _guidance(
        self,
        step: StepState,
        sigma: torch.Tensor,
        nearest: torch.Tensor,
        gate: torch.Tensor,
        t: float,
        lambda_t: float,
    ) -> torch.Tensor:
        terms, s0 = self.config.terms, step.guidance_scale
        conditional = self.denoiser.conditioning != "none"
        d_t = (step.eps_cond - step.eps_uncond).detach()
        shape = (-1, 1, 1, 1)
        sig = torch.where(gate, sigma, 0.0).to(d_t.dtype)  # unchecked samples are NaN; they get no guidance
        correction = torch.zeros_like(d_t)
        s1 = torch.zeros_like(sig)
        if conditional and "despecification" in terms:
            s1 = (self.config.c1 * sig).clamp(0.0, max(s0 - 1.0, 0.0))  # eq. 13
            correction = correction - s1.view(shape) * d_t  # G_spe = -s1 (eps(x_t, y) - eps(x_t))   (eq. 14)
        if self.denoiser.conditioning == "text" and "deduplication" in terms:
            correction = correction + self._deduplication(step, sig, s1, nearest, gate)
        if "dissimilarity" in terms:
            flow = self.denoiser.prediction_type == FLOW_PREDICTION
            # grad_{x_t} sigma_t on the variance-preserving scale: a flow model's x_t is r x'_t
            gradient = self._similarity_gradient(step, gate) * (
                flow_input_scale(step.alpha_bar_t) if flow else 1
            )
            if self.config.c3_rule == "excess":
                c3 = EXCESS_OVERSHOOT * excess_c3(sig - lambda_t, gradient, step.alpha_bar_t)
            elif self._c3 is None:
                c3 = reference_c3(sig, t, self.config.c3_origin)
            else:
                c3 = torch.full_like(sig, self._c3)
            c3 = self.config.c3_scale * c3
            # G_sim = c3 sqrt(1 - abar_t) grad_{x_t} sigma_t   (eq. 17)
            g_sim = c3.view(shape) * (1 - step.alpha_bar_t).sqrt() * gradient
            correction = correction + (velocity_correction(g_sim, step.alpha_bar_t) if flow else g_sim)
        return correction

    def _similarity_gradient(self, step: StepState, gate: torch.Tensor) -> torch.Tensor:
        """grad_{x_t} sigma_t of the gated samples (zero elsewhere), through the UNet and the decoder."""
        rows = torch.nonzero(gate).flatten().tolist()
        gradient = torch.zeros_like(step.x_t, dtype=torch.float32)
        with torch.enable_grad():
            x_t = step.x_t[rows].detach().requires_grad_(True)
            eps_cond, eps_uncond, _ = predict_pair(
                self.denoiser, x_t, step.t, step.cond.select(rows), step.null.select(rows)
            )
            # the guided prediction, as the sampler forms it (Ho & Salimans 2022, eq. 6)
            eps = (
                eps_cond
                if eps_cond is eps_uncond
                else eps_uncond + step.guidance_scale * (eps_cond - eps_uncond)
            )
            x0_hat = x0_from_prediction(
                x_t, eps, step.alpha_bar_t.to(eps.dtype), self.denoiser.prediction_type
            )
            images = self.denoiser.decode(x0_hat).float()
            sigma, _ = training_similarity(images, self.config.reference, self.config.nl2_k)
            (gradient[rows],) = torch.autograd.grad(sigma.sum(), x_t)
        return gradient.to(step.x_t.dtype)

    @property
    def _c3(self) -> float | None:
        if self.config.c3 is not None:
            return self.config.c3
        return None if self.index.kind == "embedding" else NL2_C3

    def _deduplication(
        self,
        step: StepState,
        sigma: torch.Tensor,
        s1: torch.Tensor,
        nearest: torch.Tensor,
        gate: torch.Tensor,
    ) -> torch.Tensor:
        """G_dup for the gated samples whose neighbour's caption is duplicated in the training set."""
        correction = torch.zeros_like(step.eps)
        rows = [
            i
            for i in torch.nonzero(gate).flatten().tolist()
            if self.index.caption_counts[int(nearest[i])] > self.config.min_caption_copies
        ]
        if not rows:
            return correction
        captions = [self.index.captions[int(nearest[i])] for i in rows]
        with torch.no_grad():
            eps_caption = self.denoiser.eps(step.x_t[rows].detach(), step.t, self.denoiser.encode(captions))
        self.extra_evaluations += len(rows)
        s0 = step.guidance_scale
        room = (s0 - 1.0 - s1[rows]).clamp_min(0.0)
        c2 = room / 0.3  # the reference's c2 = (s0 - 1 - s1) / 0.3
        s2 = torch.minimum((c2 * sigma[rows]).clamp_min(0.0), room)  # eq. 15
        # G_dup = -s2 (eps(x_t, y_N) - eps(x_t))   (eq. 16)
        correction[rows] = -s2.view(-1, 1, 1, 1) * (eps_caption - step.eps_uncond[rows].detach())
        return correction

    def _record(self, sigma: torch.Tensor, nearest: torch.Tensor) -> None:
        for row, (value, neighbour) in enumerate(zip(sigma.tolist(), nearest.tolist())):
            if value > self.max_similarity[row]:  # False for NaN: a step that did not check this sample
                self.max_similarity[row], self.nearest_row[row] = value, int(neighbour)


def anti_memorization_guidance(
    denoiser: Denoiser,
    prompts: Sequence,
    seeds: Sequence[int],
    config: AntiMemorizationConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sample with AMG against the configured training set."""
    scale = resolve_guidance_scale(denoiser, sampling.guidance_scale)
    if (
        denoiser.conditioning != "none"
        and scale <= 1.0
        and set(config.terms) & {"despecification", "deduplication"}
    ):
        raise DiffmemError(
            f"despecification and deduplication guidance work within classifier-free guidance (scale > 1); "
            f"got guidance_scale={scale}"
        )
    term = AntiMemorizationGuidance(denoiser, config, len(prompts))
    latents = sample(
        denoiser, denoiser.encode(list(prompts)), seeds, guidance=[term], **sampling.sample_kwargs()
    )
    index = config.reference.index
    return sampled(
        denoiser,
        sampling,
        latents,
        [str(p) for p in prompts],
        term.guided_steps,
        status=term.status,
        extra_evaluations=term.extra_evaluations,
        extras={
            "amg_max_similarity": term.max_similarity,
            "amg_checks": term.checks,
            "amg_nearest_id": [index.ids[r] if r >= 0 else None for r in term.nearest_row],
        },
    )

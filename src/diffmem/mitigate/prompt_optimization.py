"""Prompt-embedding optimisation (Wen et al., ICLR 2024, Sec. 5.1; SPEC §3): before sampling, lower the
memorization score by optimising the prompt embedding at the first step, then sample with it.

From x_T, AdamW (lr 0.05) moves every position of the prompt embedding but the start token to lower
``||eps(x_T, e_prompt) - eps(x_T, e_null)||_2`` until it is at most the target or the iteration budget
is spent. Each sample is optimised on its own with its own seed (the reference optimises a joint norm
over n generations against l_target = 3 for n = 4; the per-generation target here is l_target / sqrt(n)).
A ``start`` above the target leaves a generation whose score is at most ``start`` untouched: one
threshold cannot both spare ordinary prompts and push memorized ones far enough on every model. The norm
is the noise-norm detector's (centred by default, :mod:`diffmem.detect.noise_norm`), so that a target
read from a model's profile is on the scale of the score it lowers; the paper's preset measures it
uncentred.

With the training set (``reference``) and a gate fitted against it (``gate``, as AMG's), a generation
above ``start`` is first sampled plainly, and only one whose image ends nearer a training image than the
gate lets ordinary finished images come is optimised and sampled again; the others keep their plain
image. The first-step score alone also passes ordinary prompts that merely score high, and an embedding
optimised that far loses their meaning. A redraw the gate still confirms is optimised on, from where it
stopped, to ``DEEPENING`` of the last target, for at most ``rounds`` rounds: where the first step's pull
does not decide the copy, reaching the target need not end it. Of a generation's plain image and its
redraws, the one that ends farthest from the training set is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch

from diffmem.core.condition import Condition
from diffmem.core.denoiser import Denoiser
from diffmem.detect.detector import check_guidance
from diffmem.detect.noise_norm import difference_magnitude
from diffmem.errors import DiffmemError
from diffmem.mitigate.fitted_gate import FittedGate
from diffmem.mitigate.mitigation import Mitigated, SamplingOptions, cfg_evaluations, sampled
from diffmem.mitigate.training_similarity import ReferenceSet, training_similarity
from diffmem.sampling import sample
from diffmem.sampling.guided_sampler import first_step_input, resolve_guidance_scale

REFERENCE_TARGET_PER_GENERATION = 3.0 / 2.0  # Wen et al.: l_target = 3 as a joint norm over n = 4 generations
DEEPENING = 0.25  # each further round's target, as a share of the last (as the calibrated target's depth)


@dataclass(frozen=True)
class PromptOptimizationConfig:
    """Wen et al.'s defaults: AdamW, lr 0.05, at most 10 iterations, stop at the per-generation target."""

    target: float = REFERENCE_TARGET_PER_GENERATION  # per-generation noise norm to reach at x_T
    start: float | None = None  # optimise only a generation scoring above this at x_T (None: the target)
    max_iterations: int = 10
    learning_rate: float = 0.05
    weight_decay: float = 0.01  # torch's AdamW default, as the reference uses
    centered: bool = True  # the noise norm's measure (diffmem.detect.noise_norm); False: the paper's
    reference: ReferenceSet | None = field(default=None, compare=False)  # the training set, with ``gate``
    gate: str | None = None  # a gate file fitted to ``reference``: optimise only generations that pass it
    rounds: int = 3  # with a gate: optimise a redraw it still confirms on, at most this many times in all

    def __post_init__(self) -> None:
        if self.target < 0 or self.max_iterations < 0 or self.learning_rate <= 0 or self.rounds < 1:
            raise DiffmemError(
                "prompt optimisation needs target >= 0, max_iterations >= 0, learning_rate > 0 and rounds >= 1; "
                f"got {self.target}, {self.max_iterations}, {self.learning_rate}, {self.rounds}"
            )
        if self.start is not None and self.start < self.target:
            raise DiffmemError(
                f"prompt optimisation's start ({self.start}) must be at least its target ({self.target})"
            )
        if self.gate is not None:
            if self.reference is None:
                raise DiffmemError(
                    "prompt optimisation's gate needs the training set it was fitted against: give --index"
                )
            self.fitted_gate.check(self.reference)

    @cached_property
    def fitted_gate(self) -> FittedGate | None:
        """The gate file's curve, when ``gate`` names one."""
        return None if self.gate is None else FittedGate.load(Path(self.gate))


@dataclass(frozen=True)
class OptimizedPrompts:
    """Prompt embeddings after optimisation, one per sample."""

    cond: Condition  # the samples' conditions with the optimised prompt_embeds
    iterations: list[int]  # [B] AdamW steps each sample took
    initial_norm: list[float]  # [B] ||eps_cond - eps_uncond|| at x_T before optimisation
    final_norm: list[float]  # [B] the same with the optimised embedding
    unet_evaluations: int  # forward passes spent (backward passes not counted)


def optimize_prompt_embeddings(
    denoiser: Denoiser,
    cond: Condition,
    seeds: Sequence[int],
    config: PromptOptimizationConfig = PromptOptimizationConfig(),
    num_inference_steps: int = 50,
    scheduler=None,
    chosen: torch.Tensor | None = None,
) -> OptimizedPrompts:
    """Optimise each sample's prompt embedding (start token fixed) at its own x_T (SPEC §3); with
    ``chosen`` ([B] bool), only the chosen samples' (the others are scored and kept)."""
    _check_text_model(denoiser)
    x_t, t = first_step_input(denoiser, seeds, num_inference_steps, scheduler)
    with torch.no_grad():
        eps_uncond = denoiser.eps(x_t, t, denoiser.null_condition(cond.batch_size))
    embeds = cond["prompt_embeds"]
    start_token = embeds[:, :1]
    learned = embeds[:, 1:].detach().float().clone().requires_grad_(True)  # float32 state under AdamW
    optimizer = torch.optim.AdamW([learned], lr=config.learning_rate, weight_decay=config.weight_decay)
    done = torch.zeros(cond.batch_size, dtype=torch.bool, device=x_t.device)
    iterations = torch.zeros(cond.batch_size, dtype=torch.long)
    initial = None
    for iteration in range(config.max_iterations + 1):
        current = torch.cat([start_token, learned.to(embeds.dtype)], dim=1)
        eps_cond = denoiser.eps(x_t, t, cond.replace(prompt_embeds=current))
        # the memorization score of each generation at x_T, as the noise norm measures it
        norms = difference_magnitude(eps_cond - eps_uncond, config.centered)
        if initial is None:
            initial = norms.detach()
            done |= initial <= (config.target if config.start is None else config.start)
            if chosen is not None:
                done |= ~chosen.to(done.device)
        done |= norms.detach() <= config.target
        if bool(done.all()) or iteration == config.max_iterations:
            break
        kept = learned.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        norms.masked_fill(done, 0.0).sum().backward()  # samples are independent: a sum of their norms
        optimizer.step()
        with torch.no_grad():
            learned.copy_(torch.where(done[:, None, None], kept, learned))  # finished samples stay put
        iterations += (~done).long().cpu()
    final = torch.cat([start_token, learned.detach().to(embeds.dtype)], dim=1)
    return OptimizedPrompts(
        cond=cond.replace(prompt_embeds=final),
        iterations=iterations.tolist(),
        initial_norm=initial.cpu().tolist(),
        final_norm=norms.detach().cpu().tolist(),
        unet_evaluations=cond.batch_size * (iteration + 2),  # e_null once, e_prompt at every check
    )


def prompt_optimization(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: PromptOptimizationConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sample each prompt with its prompt embedding optimised at the first step (same seed); with a gate,
    only the samples whose plain image passes it, for as many rounds as their redraws still pass it."""
    _check_text_model(denoiser)
    check_guidance("prompt-embedding optimisation", resolve_guidance_scale(denoiser, sampling.guidance_scale))
    cond = denoiser.encode(list(prompts))
    if config.fitted_gate is not None:
        return _confirmed(denoiser, list(prompts), seeds, cond, config, sampling)
    optimized = optimize_prompt_embeddings(
        denoiser, cond, seeds, config, sampling.num_inference_steps, sampling.scheduler
    )
    return sampled(
        denoiser,
        sampling,
        sample(denoiser, optimized.cond, seeds, **sampling.sample_kwargs()),
        list(prompts),
        [sampling.num_inference_steps if n > 0 else 0 for n in optimized.iterations],
        extra_evaluations=optimized.unet_evaluations,
        extras={
            "optimization_iterations": optimized.iterations,
            "initial_norm": optimized.initial_norm,
            "final_norm": optimized.final_norm,
        },
    )


def _confirmed(
    denoiser: Denoiser,
    prompts: list[str],
    seeds: Sequence[int],
    cond: Condition,
    config: PromptOptimizationConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Optimise the generations whose plain image the gate confirms, round after round while it confirms
    their redraw; keep each one's image farthest from the training set."""
    end = config.fitted_gate.end
    latents = sample(denoiser, cond, seeds, **sampling.sample_kwargs())
    plain_similarity = _similarity(denoiser, latents, config.reference)
    kept_similarity = plain_similarity.clone()
    changed, rounds, iterations = [False] * len(prompts), [0] * len(prompts), [0] * len(prompts)
    final: list[float] = [0.0] * len(prompts)
    evaluations = 0
    rows, chosen = list(range(len(prompts))), plain_similarity > end
    optimizer_config = replace(config, reference=None, gate=None)
    for round_ in range(config.rounds):
        optimized = optimize_prompt_embeddings(
            denoiser,
            cond.select(rows),
            [seeds[i] for i in rows],
            optimizer_config,
            sampling.num_inference_steps,
            sampling.scheduler,
            chosen,
        )
        evaluations += optimized.unet_evaluations
        if round_ == 0:
            initial = optimized.initial_norm  # every generation's score at x_T, as it was
        for row, n, norm in zip(rows, optimized.iterations, optimized.final_norm):
            iterations[row] += n
            final[row] = norm
        moved = [i for i, n in enumerate(optimized.iterations) if n > 0]
        if not moved:
            break
        rows = [rows[i] for i in moved]
        embeds = cond["prompt_embeds"].clone()
        embeds[rows] = optimized.cond["prompt_embeds"][moved]
        cond = cond.replace(prompt_embeds=embeds)
        redrawn = sample(denoiser, cond.select(rows), [seeds[i] for i in rows], **sampling.sample_kwargs())
        evaluations += cfg_evaluations(denoiser, len(rows), sampling.num_inference_steps)
        similarity = _similarity(denoiser, redrawn, config.reference)
        for row, image, sigma in zip(rows, redrawn, similarity):
            rounds[row] += 1
            # a redraw that ends nearer the training set than the image kept so far is not kept
            if sigma <= kept_similarity[row]:
                latents[row], kept_similarity[row], changed[row] = image, sigma, True
        rows, chosen = [row for row, sigma in zip(rows, similarity.tolist()) if sigma > end], None
        if not rows:
            break
        optimizer_config = replace(optimizer_config, target=optimizer_config.target * DEEPENING, start=None)
    return sampled(
        denoiser,
        sampling,
        latents,
        prompts,
        [sampling.num_inference_steps if c else 0 for c in changed],
        extra_evaluations=evaluations,
        extras={
            "optimization_iterations": iterations,
            "optimization_rounds": rounds,
            "initial_norm": initial,
            "final_norm": final,
            "plain_similarity": plain_similarity.tolist(),
        },
    )


def _similarity(denoiser: Denoiser, latents: torch.Tensor, reference: ReferenceSet) -> torch.Tensor:
    """sigma [B] of each finished sample against the training set, as AMG's gate measures it."""
    with torch.no_grad():
        return training_similarity(denoiser.decode(latents).float(), reference)[0].cpu()


def _check_text_model(denoiser: Denoiser) -> None:
    if denoiser.conditioning != "text":
        raise DiffmemError(
            f"prompt-embedding optimisation needs a text-conditioned model; {denoiser.family} is conditioned "
            f"on {denoiser.conditioning!r}"
        )

"""Sharpness detection (Jeon et al., ICML 2025; SPEC §7): a memorized prompt makes the conditional density
sharp around x_T, so the gap between conditional and unconditional scores changes fast along itself.

With ``d(x) = eps_cond(x) - eps_uncond(x)`` at the first timestep of the schedule, a generation's value
is ``||J_d(x_T) d(x_T)||_2`` over the whole sample (C x H x W), from one forward-mode Jacobian-vector
product; a prompt's score is the mean over generations. Neither term involves the guidance scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from diffmem.core.condition import Condition
from diffmem.core.denoiser import Denoiser
from diffmem.detect.detector import DetectionResult, batch_starts, check_prompts, detection_seeds
from diffmem.detect.first_step import first_step
from diffmem.detect.noise_norm import difference_norm
from diffmem.errors import DiffmemError
from diffmem.sampling import StepState

# A JVP runs every UNet operation on the primal and on the tangent; the tangent of a product costs two
# products, so a JVP costs at most 3 forward passes of FLOPs (between 2 and 3 in practice).
JVP_EVALUATIONS_PER_CALL = 3


@dataclass(frozen=True)
class SharpnessConfig:
    """How often to measure (defaults: the first of 50 DDIM steps, n = 1; Jeon et al. also report n = 4)."""

    num_inference_steps: int = 50  # sets the first timestep t of the schedule
    n_generations: int = 1
    base_seed: int = 0
    batch_size: int = 8  # samples per batched call; the JVP's unfused attention holds whole attention maps


def sharpness(
    denoiser: Denoiser,
    prompts: Sequence[str],
    config: SharpnessConfig = SharpnessConfig(),
    prompt_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> DetectionResult:
    """Jeon et al.'s first-step sharpness of each prompt (higher: more likely memorized).

    ``extras["d_norm"]`` holds the noise norm at the same x_T (as ``noise_norm`` measures it), averaged over
    generations.
    """
    if denoiser.conditioning == "none":
        raise DiffmemError(
            "sharpness compares conditional and unconditional predictions; this model is unconditional"
        )
    prompts, prompt_ids = check_prompts(prompts, prompt_ids)
    n = config.n_generations
    seeds = detection_seeds(config.base_seed, prompt_ids, n)
    rows = [p for p in range(len(prompts)) for _ in range(n)]
    values, d_norms = [], []
    for start in tqdm(batch_starts(len(rows), config.batch_size), desc="sharpness", disable=not progress):
        chunk = slice(start, start + config.batch_size)
        cond = denoiser.encode([prompts[p] for p in rows[chunk]])
        step = first_step(denoiser, cond, seeds[chunk], config.num_inference_steps)
        d = step.eps_cond - step.eps_uncond
        # s = -eps / sqrt(1 - abar_t): ||(H_c - H_u) s_delta|| = ||J_d d|| / (1 - abar_t), a shared factor
        values.append(difference_jvp(denoiser, step, d).flatten(1).float().norm(dim=1).cpu())
        d_norms.append(difference_norm(step.eps_cond, step.eps_uncond))
    # per generation: the CFG pair at x_T (2) and the JVP of that pair (2 calls)
    evaluations_per_generation = 2 + 2 * JVP_EVALUATIONS_PER_CALL
    return DetectionResult(
        detector="sharpness",
        scores=torch.cat(values).reshape(len(prompts), n).mean(dim=1),
        seeds=torch.tensor(seeds).reshape(len(prompts), n),
        unet_evaluations_per_prompt=float(n * evaluations_per_generation),
        extras={"d_norm": torch.cat(d_norms).reshape(len(prompts), n).mean(dim=1)},
    )


def difference_jvp(denoiser: Denoiser, step: StepState, tangent: torch.Tensor) -> torch.Tensor:
    """``J_d(x_t) tangent`` ([B, C, H, W]) for ``d(x) = eps_cond(x) - eps_uncond(x)`` at the step's x_t, t."""
    pair = Condition.cat([step.null, step.cond])

    def d(x: torch.Tensor) -> torch.Tensor:
        eps_uncond, eps_cond = denoiser.eps(torch.cat([x, x]), step.t, pair).chunk(2)
        return eps_cond - eps_uncond

    # Forward-mode AD has no formula for the fused attention kernels (flash, memory-efficient); the math
    # kernel is matmuls and a softmax, which have one. A double-backward JVP is no way around it: the
    # fused kernels' backward cannot be differentiated either, and it would keep the whole graph.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, jvp = torch.func.jvp(d, (step.x_t,), (tangent,))
    return jvp

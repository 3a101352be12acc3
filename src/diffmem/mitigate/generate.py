"""Batched generation with a mitigation: many prompts, several generations each, optionally behind the
guard (only prompts the first-step detector flags are mitigated; the rest are sampled plainly)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from diffmem.core.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.mitigate.guard import Guard, guard_decision
from diffmem.mitigate.mitigation import NoMitigationConfig, SamplingOptions
from diffmem.mitigate.registry import mitigation
from diffmem.sampling.guided_sampler import resolve_guidance_scale
from diffmem.sampling.seeds import generation_seed


@dataclass(frozen=True)
class MitigatedGeneration:
    """Samples, prompt-major (all generations of prompt 0, then of prompt 1, ...), and what was done."""

    latents: torch.Tensor  # [N, C, H, W] final samples in the sampling space
    images: torch.Tensor | None  # [N, 3, H', W'] in [0, 1], None when not decoded
    items: list  # [N] the prompt (or label) of each sample
    prompt_id: list[int]  # [N]
    generation: list[int]  # [N]
    seeds: list[int]  # [N]
    method: list[str]  # [N] the mitigation applied ("none": sampled plainly, e.g. let through by the guard)
    prompts_used: list[str]  # [N]
    guided_steps: list[int]  # [N]
    status: list[str]  # [N]
    guard_score: list[float | None]  # [N] the guard's first-step score of the prompt; None without a guard
    unet_evaluations: int  # UNet forward passes of the whole run, the guard's included
    extras: dict[str, list] = field(default_factory=dict)  # [N] each; None where a method has no value

    def to_table(self) -> pa.Table:
        """One row per sample: ids, seed, prompt, method, what the mitigation did, the guard's score."""
        columns = {
            "prompt_id": pa.array(self.prompt_id, pa.int64()),
            "generation": pa.array(self.generation, pa.int32()),
            "seed": pa.array(self.seeds, pa.int64()),
            "prompt": pa.array([None if i is None else str(i) for i in self.items], pa.string()),
            "method": pa.array(self.method, pa.string()),
            "prompt_used": pa.array([None if p is None else str(p) for p in self.prompts_used], pa.string()),
            "guided_steps": pa.array(self.guided_steps, pa.int32()),
            "status": pa.array(self.status, pa.string()),
            "guard_score": pa.array(self.guard_score, pa.float64()),
        }
        return pa.table({**columns, **{name: pa.array(values) for name, values in self.extras.items()}})


def mitigated_generate(
    denoiser: Denoiser,
    items: Sequence,
    name: str,
    config: Any,
    *,
    n_generations: int = 1,
    base_seed: int = 0,
    prompt_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    sampling: SamplingOptions = SamplingOptions(),  # noqa: B008  (frozen)
    guard: Guard | None = None,
    decode: bool = True,
    progress: bool = False,
) -> MitigatedGeneration:
    """Sample every item ``n_generations`` times with mitigation ``name`` (behind ``guard``, if given).

    Seeds are ``generation_seed(base_seed, prompt_id, generation)`` and batches are formed as in
    :func:`diffmem.sampling.generate`, so a sample the guard lets through is bit for bit the sample
    plain generation with the same ``batch_size`` gives.
    """
    items = list(items)
    prompt_ids = list(range(len(items))) if prompt_ids is None else [int(i) for i in prompt_ids]
    if not items or len(prompt_ids) != len(items):
        raise DiffmemError(
            f"give at least one prompt and one id per prompt; got {len(items)} and {len(prompt_ids)}"
        )
    if n_generations < 1 or batch_size < 1:
        raise DiffmemError("n_generations and batch_size must be at least 1")
    resolve_guidance_scale(denoiser, sampling.guidance_scale)  # fail before any work
    _, apply = mitigation(name)
    plain_config, (_, plain) = NoMitigationConfig(), mitigation("none")
    evaluations, scores, flagged = 0, [None] * len(items), [True] * len(items)
    if guard is not None:
        decision = guard_decision(denoiser, items, prompt_ids, guard)
        scores, flagged, evaluations = decision.scores.tolist(), decision.flagged, decision.unet_evaluations
    rows = [(i, g) for i in range(len(items)) for g in range(n_generations)]
    seeds = [generation_seed(base_seed, prompt_ids[i], g) for i, g in rows]
    outputs: list[Any] = [None] * len(rows)  # (latent, image, method, prompt_used, steps, status, extras)
    routed = flagged if name != "none" else [False] * len(items)  # "none" behind the guard only scores
    mitigated = [r for r, (i, _) in enumerate(rows) if routed[i]]
    # a batch with a prompt the guard lets through runs exactly as plain sampling would run it (same
    # rows, same batch), so those samples are bit-identical to plain sampling; its flagged rows are
    # mitigated below and their plain samples discarded
    plain_batches = [
        ("none", list(range(start, min(start + batch_size, len(rows)))))
        for start in range(0, len(rows), batch_size)
        if not all(routed[i] for i, _ in rows[start : start + batch_size])
    ]
    batches = plain_batches + [
        (name, mitigated[s : s + batch_size]) for s in range(0, len(mitigated), batch_size)
    ]
    bar = tqdm(total=sum(len(b) for _, b in batches), desc="generating", unit="image", disable=not progress)
    stepped = replace(sampling, progress=progress)
    for method, batch in batches:
        function, method_config = (apply, config) if method == name else (plain, plain_config)
        result = function(
            denoiser, [items[rows[r][0]] for r in batch], [seeds[r] for r in batch], method_config, stepped
        )
        bar.update(len(batch))
        evaluations += result.unet_evaluations
        images = None
        if decode:
            with torch.no_grad():
                images = denoiser.decode(result.latents).float().cpu()
        for k, r in enumerate(batch):
            if method != name and routed[rows[r][0]]:
                continue  # the plain twin of a flagged sample
            extras = {key: values[k] for key, values in result.extras.items()}
            outputs[r] = (
                result.latents[k],
                None if images is None else images[k],
                method,
                result.prompts_used[k],
                result.guided_steps[k],
                result.status[k],
                extras,
            )
    bar.close()
    extra_names = list(dict.fromkeys(key for output in outputs for key in output[6]))
    return MitigatedGeneration(
        latents=torch.stack([o[0] for o in outputs]),
        images=torch.stack([o[1] for o in outputs]) if decode else None,
        items=[items[i] for i, _ in rows],
        prompt_id=[prompt_ids[i] for i, _ in rows],
        generation=[g for _, g in rows],
        seeds=seeds,
        method=[o[2] for o in outputs],
        prompts_used=[o[3] for o in outputs],
        guided_steps=[o[4] for o in outputs],
        status=[o[5] for o in outputs],
        guard_score=[scores[i] for i, _ in rows],
        unet_evaluations=evaluations,
        extras={key: [o[6].get(key) for o in outputs] for key in extra_names},
    )

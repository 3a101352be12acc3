"""Cross-attention maps per word (the second view of an explanation): where in the image each word of
the prompt is attended to at a chosen sampling step, on the ordinary CFG trajectory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffmem.core.condition import Condition
from diffmem.core.denoiser import Denoiser, require_cross_attention, require_start_token
from diffmem.detect.attention_entropy import recording_cross_attention
from diffmem.detect.detector import check_guidance, detection_seeds
from diffmem.detect.first_step import first_step_input
from diffmem.errors import DiffmemError
from diffmem.explain.token_significance import SignificanceConfig, prompt_words
from diffmem.sampling import sample
from diffmem.sampling.guided_sampler import eps_scheduler


@dataclass(frozen=True)
class WordAttention:
    """Attention each latent position pays to each word, averaged over heads, layers and generations."""

    words: list[str]
    maps: torch.Tensor  # [words, H, W] in the sampling space's grid; a position's shares sum to <= 1
    step: int


def word_attention_maps(
    denoiser: Denoiser,
    prompt: str,
    step: int = 0,
    config: SignificanceConfig | None = None,
    prompt_id: int = 0,
) -> WordAttention:
    """Per-word cross-attention maps of the conditional prediction at sampling step ``step``."""
    config = config or SignificanceConfig()
    check_guidance("attention maps", config.guidance_scale)
    require_cross_attention(denoiser, "attention maps")
    require_start_token(denoiser, "attention maps")
    tokenizer = denoiser.tokenizer
    if tokenizer is None or not prompt.strip():
        raise DiffmemError(
            "attention maps need a text-conditioned model with a tokenizer and a non-empty prompt"
        )
    if not 0 <= step < config.num_inference_steps:
        raise DiffmemError(f"step must be in 0..{config.num_inference_steps - 1}; got {step}")
    n = config.n_generations
    cond = denoiser.encode([prompt]).repeat_interleave(n)
    x_t, t = _input_at(denoiser, cond, detection_seeds(config.base_seed, [prompt_id], n), step, config)
    network = denoiser.network
    with torch.no_grad(), recording_cross_attention(network, _per_query) as layers:
        denoiser.eps(x_t, t, cond)
    if not layers:
        raise DiffmemError(f"{type(network).__name__} has no cross-attention")
    height, width = x_t.shape[-2:]
    # [B, queries, tokens] per layer -> [tokens, H, W], averaged over layers and generations
    grid = torch.stack([_on_grid(a, height, width) for a in layers]).mean(dim=(0, 1))
    parsed = prompt_words(prompt, tokenizer, grid.shape[0])
    maps = torch.zeros(len(parsed.words), height, width)
    for position, word in enumerate(parsed.token_words, start=1):
        maps[word] += grid[position]
    return WordAttention(parsed.words, maps, step)


def _per_query(probs: torch.Tensor) -> torch.Tensor:
    """[B, heads, queries, tokens] -> [B, queries, tokens], the mean over heads."""
    return probs.float().mean(dim=1).cpu()


def _on_grid(attention: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, queries, tokens] of a layer at its own resolution -> [B, tokens, H, W] on the sampling grid."""
    batch, queries, tokens = attention.shape
    rows = round((queries * height / width) ** 0.5)
    maps = attention.transpose(1, 2).reshape(batch, tokens, rows, queries // rows)
    return F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)


def _input_at(
    denoiser: Denoiser, cond: Condition, seeds: list[int], step: int, config: SignificanceConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input and timestep of sampling step ``step`` of the CFG trajectory."""
    if step == 0:
        return first_step_input(denoiser, seeds, config.num_inference_steps)
    schedule = eps_scheduler(denoiser.scheduler)
    schedule.set_timesteps(config.num_inference_steps, device=denoiser.device)
    t = schedule.timesteps[step]
    latents = sample(
        denoiser,
        cond,
        seeds,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        max_steps=step,
    )
    return schedule.scale_model_input(latents, t), t

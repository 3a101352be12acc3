"""Cross-attention entropy detection (Ren et al., ECCV 2024; SPEC §7): for a memorized prompt, the
conditional branch spreads its attention over all text tokens at the first step instead of resting it
on the beginning token.

Per generation and cross-attention layer, the attention probabilities of the conditional prediction at
x_T, averaged over heads and image positions, form a distribution ``a`` over the text tokens (padding
included); its entropy is ``E = -sum_i a_i log a_i``. A prompt's score is E averaged over the chosen
layers and the generations. Only the conditional prediction is computed: E needs no unconditional one,
and the guidance scale does not enter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from tqdm.auto import tqdm

from diffmem.core.denoiser import Denoiser, require_cross_attention
from diffmem.detect.detector import DetectionResult, batch_starts, check_prompts, detection_seeds
from diffmem.detect.first_step import first_step_input
from diffmem.errors import DiffmemError


@dataclass(frozen=True)
class AttentionEntropyConfig:
    """Where, how often and in which layers to measure (defaults: first step of 50 DDIM steps, n = 1)."""

    num_inference_steps: int = 50  # sets the first timestep t of the schedule
    n_generations: int = 1
    base_seed: int = 0
    batch_size: int = 32  # samples (prompt x generation) per batched call
    # cross-attention layers to average, by position in forward order; None: all of them. Ren et al.'s
    # detection script ("mode E") scores a single SD 1.x layer, index 3 of the maps its UNet collects
    layers: tuple[int, ...] | None = None


def token_distribution(probs: torch.Tensor) -> torch.Tensor:
    """[B, heads, queries, tokens] attention probabilities -> [B, tokens], the mean over heads and queries."""
    return probs.float().mean(dim=(1, 2))


class _TappedAttention:
    """An attention module that also hands its attention probabilities, reduced, to ``keep``."""

    def __init__(
        self,
        attn: Attention,
        keep: Callable[[torch.Tensor], None],
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self._attn = attn
        self._keep = keep
        self._reduce = reduce

    def __getattr__(self, name: str) -> object:
        return getattr(self._attn, name)

    def get_attention_scores(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        probs = self._attn.get_attention_scores(query, key, attention_mask)  # [B * heads, queries, tokens]
        self._keep(self._reduce(probs.unflatten(0, (-1, self._attn.heads))))
        return probs


class CrossAttentionRecorder(AttnProcessor):
    """Cross-attention with explicit probabilities ([B, heads, queries, tokens]), which go through
    ``reduce`` to ``keep``; self-attention runs on the processor this one replaces."""

    def __init__(
        self,
        replaced: object,
        keep: Callable[[torch.Tensor], None],
        reduce: Callable[[torch.Tensor], torch.Tensor] = token_distribution,
    ) -> None:
        self.replaced = replaced
        self.keep = keep
        self.reduce = reduce

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self.replaced(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        tapped = _TappedAttention(attn, self.keep, self.reduce)
        return super().__call__(
            tapped, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )


@contextmanager
def recording_cross_attention(
    network: torch.nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] = token_distribution
) -> Iterator[list[torch.Tensor]]:
    """Within the block, each cross-attention call of ``network`` appends its probabilities reduced by
    ``reduce`` (default: the token distribution, [B, tokens]) to the yielded list, in forward order."""
    if not hasattr(network, "set_attn_processor"):
        raise DiffmemError(f"{type(network).__name__} has no diffusers attention processors to record from")
    replaced = network.attn_processors
    maps: list[torch.Tensor] = []
    try:
        network.set_attn_processor(
            {name: CrossAttentionRecorder(p, maps.append, reduce) for name, p in replaced.items()}
        )
        yield maps
    finally:
        network.set_attn_processor(replaced)


def token_entropy(distributions: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of distributions over the last dimension."""
    # E = -sum_i a_i log a_i   (Ren et al., entropy of the cross-attention scores over tokens)
    return -torch.special.xlogy(distributions, distributions).sum(dim=-1)


def attention_entropy(
    denoiser: Denoiser,
    prompts: Sequence[str],
    config: AttentionEntropyConfig = AttentionEntropyConfig(),
    prompt_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> DetectionResult:
    """Ren et al.'s first-step cross-attention entropy of each prompt (higher: more likely memorized).

    ``extras["per_layer"]`` holds E of every cross-attention layer in forward order, [P, L], averaged
    over generations.
    """
    require_cross_attention(denoiser, "attention_entropy")
    prompts, prompt_ids = check_prompts(prompts, prompt_ids)
    network = denoiser.network
    n = config.n_generations
    seeds = detection_seeds(config.base_seed, prompt_ids, n)
    rows = [p for p in range(len(prompts)) for _ in range(n)]
    entropies, selected = [], []
    for start in tqdm(
        batch_starts(len(rows), config.batch_size), desc="attention entropy", disable=not progress
    ):
        chunk = slice(start, start + config.batch_size)
        cond = denoiser.encode([prompts[p] for p in rows[chunk]])
        x_T, t = first_step_input(denoiser, seeds[chunk], config.num_inference_steps)
        with torch.no_grad(), recording_cross_attention(network) as maps:
            denoiser.eps(x_T, t, cond)
        if not maps:
            raise DiffmemError(f"attention_entropy needs cross-attention; {type(network).__name__} has none")
        entropies.append(token_entropy(torch.stack(maps, dim=1)).cpu())  # [B, L]
        selected.append(_select_layers(entropies[-1], config.layers).mean(dim=1))
    return DetectionResult(
        detector="attention_entropy",
        scores=torch.cat(selected).reshape(len(prompts), n).mean(dim=1),
        seeds=torch.tensor(seeds).reshape(len(prompts), n),
        unet_evaluations_per_prompt=float(n),  # the conditional prediction at x_T, once per generation
        extras={"per_layer": torch.cat(entropies).reshape(len(prompts), n, -1).mean(dim=1)},
    )


def _select_layers(per_layer: torch.Tensor, layers: tuple[int, ...] | None) -> torch.Tensor:
    """The columns of the chosen layers ([B, L] -> [B, len(layers)])."""
    count = per_layer.shape[1]
    if layers is None:
        return per_layer
    if not layers or any(not 0 <= i < count for i in layers):
        raise DiffmemError(
            f"layers must be positions among the {count} cross-attention layers (0..{count - 1}); "
            f"got {layers}"
        )
    return per_layer[:, list(layers)]

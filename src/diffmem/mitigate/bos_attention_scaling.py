"""Beginning-token attention scaling (Ren et al., "Unveiling and Mitigating Memorization in Text-to-image
Diffusion Models through Cross Attention", ECCV 2024; SPEC §7).

For a memorized prompt the conditional branch spreads its cross-attention over the prompt's tokens
instead of resting it on the beginning (BOS) token. The inference-time mitigation multiplies the BOS
token's attention logit by C = 1.25 in every cross-attention layer of the conditional prediction, at every
step: ``logit_0 <- C * logit_0`` with ``logit_i = q . k_i / sqrt(d)``, so more attention goes to BOS and
less to the prompt's words. The unconditional prediction is left as it is.

The logit is scaled through the key: ``C * (q . k_0) / sqrt(d) = q . (C k_0) / sqrt(d)``, so the model's own
attention processor (scaled-dot-product attention by default) runs unchanged on a BOS key multiplied by C
in the conditional half of the batch. This equals the authors' explicit ``attn_weight[cond, :, :, 0] *= c1``
(``refactored_attention_processor.py``) as long as the BOS position is not masked, which it never is.
The conditional half is the second half of each UNet batch: the sampler evaluates ``[null, cond]`` in one
call.

The reference's mitigation command also passes ``--cross_attn_mask``, which masks the padding tokens
after each prompt's end token in both branches; SPEC §7 names the BOS scaling alone, so the mask is an
option here (``mask_padding``, off by default).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention

from diffmem.core.denoiser import Denoiser, require_cross_attention, require_start_token
from diffmem.errors import DiffmemError
from diffmem.mitigate.mitigation import Mitigated, SamplingOptions, sampled
from diffmem.sampling import sample
from diffmem.text.prompt_tokens import token_counts


@dataclass(frozen=True)
class BosAttentionScalingConfig:
    """How much to scale the BOS attention logit of the conditional branch."""

    scale: float = 1.25  # C, Ren et al.'s c1; 1.0 leaves the model unchanged
    mask_padding: bool = False  # the reference's --cross_attn_mask: no attention to keys after the end token

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise DiffmemError(f"scale must be a positive number; got {self.scale}")


class _BosScaledKeys:
    """An attention module whose key projection multiplies the BOS key of the batch's second half by
    ``scale``; everything else is the wrapped module's."""

    def __init__(self, attn: Attention, scale: float) -> None:
        self._attn = attn
        self._scale = scale
        self.projected = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._attn, name)

    def to_k(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        key = self._attn.to_k(encoder_hidden_states)  # [2B, tokens, heads * head_dim]
        if key.shape[0] % 2:
            raise DiffmemError(
                f"bos_attention_scaling expects [unconditional, conditional] batches; got {key.shape[0]} rows"
            )
        factor = torch.ones(key.shape[0], key.shape[1], 1, dtype=key.dtype, device=key.device)
        factor[key.shape[0] // 2 :, 0] = self._scale
        self.projected = True
        # q . (C k_0) / sqrt(d) = C logit_0 in the conditional branch (Ren et al., BOS logit rescaling)
        return key * factor


class BosScaledCrossAttention:
    """A cross-attention processor that runs the processor it replaces with the conditional branch's BOS
    key scaled (so the model's scaled-dot-product attention is kept) and, given each row's number of
    prompt tokens, the keys after them masked."""

    def __init__(self, replaced: object, scale: float, key_lengths: Sequence[int] | None = None) -> None:
        self.replaced = replaced
        self.scale = scale
        self.key_lengths = key_lengths
        self._padding: torch.Tensor | None = None  # the same for every layer call of one sampling run

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
        scaled = _BosScaledKeys(attn, self.scale)
        if self.key_lengths is not None:
            padding = self._padding_for(encoder_hidden_states, hidden_states.dtype)
            attention_mask = padding if attention_mask is None else attention_mask + padding
        output = self.replaced(
            scaled, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )
        if not scaled.projected:
            raise DiffmemError(
                f"bos_attention_scaling needs cross-attention that projects keys with to_k; "
                f"{type(self.replaced).__name__} does not"
            )
        return output

    def _padding_for(self, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The padding mask for these keys, built once and reused while rows, tokens, device and dtype
        hold (another batch rebuilds it, and is checked)."""
        cached = self._padding
        if (
            cached is None
            or (cached.shape[0], cached.shape[-1]) != (keys.shape[0], keys.shape[1])
            or (cached.device, cached.dtype) != (keys.device, dtype)
        ):
            self._padding = _padding_bias(self.key_lengths, keys, dtype)
        return self._padding


def _padding_bias(key_lengths: Sequence[int], keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask [rows, 1, tokens]: 0 on each row's first ``key_lengths`` keys, the
    dtype's minimum on the padding after them."""
    if keys is None or keys.shape[0] != len(key_lengths):
        rows = None if keys is None else keys.shape[0]
        raise DiffmemError(f"the padding mask has {len(key_lengths)} rows; the attention batch has {rows}")
    positions = torch.arange(keys.shape[1], device=keys.device)
    lengths = torch.tensor(list(key_lengths), device=keys.device)
    padding = positions[None, :] >= lengths[:, None]  # [rows, tokens]
    bias = torch.zeros(padding.shape, dtype=dtype, device=keys.device).masked_fill(
        padding, torch.finfo(dtype).min
    )
    return bias[:, None, :]


@contextmanager
def scaled_bos_attention(
    network: torch.nn.Module, scale: float, key_lengths: Sequence[int] | None = None
) -> Iterator[None]:
    """Within the block, every cross-attention layer of ``network`` multiplies the BOS logit of the second
    half of its batch (the conditional branch) by ``scale`` and, with ``key_lengths`` (prompt tokens of
    each row of the [unconditional, conditional] batch), attends to no key after them; the original
    processors are restored after."""
    if not hasattr(network, "set_attn_processor"):
        raise DiffmemError(f"{type(network).__name__} has no diffusers attention processors to scale")
    replaced = network.attn_processors
    cross = [name for name in replaced if _layer(network, name).is_cross_attention]
    if not cross:
        raise DiffmemError(f"bos_attention_scaling needs cross-attention; {type(network).__name__} has none")
    for name in cross:
        if getattr(_layer(network, name), "norm_k", None) is not None:
            raise DiffmemError(f"{name} normalises its keys, which would undo the BOS scaling")
    scaled = {
        name: BosScaledCrossAttention(p, scale, key_lengths) if name in cross else p
        for name, p in replaced.items()
    }
    try:
        network.set_attn_processor(scaled)
        yield
    finally:
        network.set_attn_processor(replaced)


def _layer(network: torch.nn.Module, processor_name: str) -> Attention:
    """The attention module a processor name (``...attn2.processor``) belongs to."""
    return network.get_submodule(processor_name.removesuffix(".processor"))


def bos_attention_scaling(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: BosAttentionScalingConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sampling with the conditional branch's BOS attention logits multiplied by ``config.scale``."""
    if denoiser.conditioning != "text":
        raise DiffmemError(
            f"bos_attention_scaling needs a text-conditioned model; {denoiser.family} is conditioned on "
            f"{denoiser.conditioning!r}"
        )
    require_cross_attention(denoiser, "bos_attention_scaling")
    require_start_token(denoiser, "bos_attention_scaling")
    cond = denoiser.encode(list(prompts))
    key_lengths = _key_lengths(denoiser, list(prompts)) if config.mask_padding else None
    with scaled_bos_attention(denoiser.network, config.scale, key_lengths):
        latents = sample(denoiser, cond, seeds, **sampling.sample_kwargs())
    changed = sampling.num_inference_steps if config.scale != 1.0 or config.mask_padding else 0
    return sampled(denoiser, sampling, latents, list(prompts), changed)


def _key_lengths(denoiser: Denoiser, prompts: list[str]) -> list[int]:
    """Tokens (start and end included, at most the encoder's limit) of each row of the sampler's
    [unconditional, conditional] batch: the empty prompt's, then each prompt's."""
    counts = token_counts(denoiser, [""] * len(prompts) + prompts)
    if counts is None:
        raise DiffmemError("mask_padding needs the model's tokenizer to find where each prompt ends")
    return [min(n, counts.limit) for n in counts.counts]

"""Prompt perturbation at inference (Somepalli et al., "Understanding and Mitigating Copying in Diffusion
Models", NeurIPS 2023; SPEC §7): randomise the text conditioning so it stops acting as the key to one
memorized training image.

- GNI, Gaussian noise injection: ``e' = e + lambda * n``, ``n ~ N(0, I)``, on the prompt's text embedding
  (every token position, BOS and padding included), lambda = 0.1. The prompt text is kept.
- RT, random token: a token drawn from the tokenizer's vocabulary, decoded to text, inserted as a word.
- CWR, caption word repetition: a word of the caption (split on single spaces) inserted again.
- RNA, random number addition: a number drawn uniformly from [0, 100000) inserted as a word.

The text methods insert at a uniformly random word boundary of the caption split on single spaces, as
the authors' ``insert_rand_word`` does (github.com/somepago/DCR); a sample draws its words first, then
their positions. DCR's ``diff_inference.py`` inserts twice by default (``--rand_aug_repeats 2``);
``insertions`` defaults to one insertion, as SPEC §7 states the methods.

Where this differs from the reference code: DCR's GNI adds the noise inside ``_encode_prompt``, whose
output also holds the unconditional embedding; here only the prompt's embedding gets noise (SPEC §7), so
``eps_uncond`` stays the model's. RT draws among the vocabulary's non-special tokens (DCR: ids below
49400 of CLIP's 49408, which leaves out CLIP's special tokens) and draws again when a token decodes to
empty text or text containing whitespace, so exactly one word is inserted.

Each sample's randomness derives from its own seed through a ``random.Random`` stream of its own (the
GNI noise through a torch generator seeded from that stream, so the noise is not the sample's x_T).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.core.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.mitigate.mitigation import Mitigated, SamplingOptions, sampled
from diffmem.sampling import sample


@dataclass(frozen=True)
class GaussianNoiseInjectionConfig:
    """GNI: Gaussian noise on the prompt's text embedding."""

    std: float = 0.1  # lambda, the noise's standard deviation (Somepalli et al.)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.std) and self.std >= 0):
            raise DiffmemError(f"std must be a non-negative number; got {self.std}")


@dataclass(frozen=True)
class RandomTokenConfig:
    """RT: random vocabulary tokens inserted into the prompt."""

    insertions: int = 1

    def __post_init__(self) -> None:
        _check_insertions(self.insertions)


@dataclass(frozen=True)
class CaptionWordRepetitionConfig:
    """CWR: words of the prompt repeated at random positions."""

    insertions: int = 1

    def __post_init__(self) -> None:
        _check_insertions(self.insertions)


@dataclass(frozen=True)
class RandomNumberConfig:
    """RNA: random numbers inserted into the prompt."""

    insertions: int = 1
    max_number: int = 100_000  # numbers are drawn from [0, max_number) (DCR: np.random.choice(100000))

    def __post_init__(self) -> None:
        _check_insertions(self.insertions)
        if self.max_number < 1:
            raise DiffmemError(f"max_number must be at least 1; got {self.max_number}")


def gaussian_noise_injection(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: GaussianNoiseInjectionConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sampling from each prompt's text embedding plus Gaussian noise drawn from the sample's seed."""
    _check_batch(prompts, seeds)
    cond = denoiser.encode(list(prompts))
    if "prompt_embeds" not in cond.tensors:
        raise DiffmemError(
            f"gaussian_noise_injection needs a text-conditioned model; {denoiser.family} is conditioned "
            f"on {denoiser.conditioning!r}"
        )
    embeds = cond["prompt_embeds"]
    generators = [torch.Generator().manual_seed(_stream(seed).getrandbits(63)) for seed in seeds]
    noise = torch.stack([torch.randn(embeds.shape[1:], generator=g) for g in generators])
    noise = noise.to(embeds.device, embeds.dtype)
    # e' = e + lambda * n, n ~ N(0, I)   (Somepalli et al. 2023, GNI)
    noisy = cond.replace(prompt_embeds=embeds + config.std * noise)
    latents = sample(denoiser, noisy, seeds, **sampling.sample_kwargs())
    changed = sampling.num_inference_steps if config.std > 0 else 0
    return sampled(denoiser, sampling, latents, list(prompts), changed)


def random_token(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: RandomTokenConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sampling from each prompt with random vocabulary tokens inserted at random positions (RT)."""
    _check_batch(prompts, seeds)
    tokenizer = _tokenizer(denoiser, "random_token")
    special = set(tokenizer.all_special_ids)
    perturbed, inserted = [], []
    for prompt, seed in zip(prompts, seeds):
        rng = _stream(seed)
        words = [_random_token(tokenizer, special, rng) for _ in range(config.insertions)]
        perturbed.append(_insert_words(prompt, words, rng))
        inserted.append(words)
    return _sample_perturbed(denoiser, perturbed, inserted, seeds, sampling)


def caption_word_repetition(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: CaptionWordRepetitionConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sampling from each prompt with random words of its own repeated at random positions (CWR)."""
    _check_batch(prompts, seeds)
    _tokenizer(denoiser, "caption_word_repetition")
    perturbed, inserted = [], []
    for prompt, seed in zip(prompts, seeds):
        rng = _stream(seed)
        # words of the caption as written, before any insertion   (Somepalli et al. 2023, CWR)
        words = [rng.choice(prompt.split(" ")) for _ in range(config.insertions)]
        perturbed.append(_insert_words(prompt, words, rng))
        inserted.append(words)
    return _sample_perturbed(denoiser, perturbed, inserted, seeds, sampling)


def random_number(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: RandomNumberConfig,
    sampling: SamplingOptions,
) -> Mitigated:
    """Sampling from each prompt with random numbers inserted at random positions (RNA)."""
    _check_batch(prompts, seeds)
    _tokenizer(denoiser, "random_number")
    perturbed, inserted = [], []
    for prompt, seed in zip(prompts, seeds):
        rng = _stream(seed)
        # numbers uniform on [0, max_number)   (Somepalli et al. 2023, RNA)
        words = [str(rng.randrange(config.max_number)) for _ in range(config.insertions)]
        perturbed.append(_insert_words(prompt, words, rng))
        inserted.append(words)
    return _sample_perturbed(denoiser, perturbed, inserted, seeds, sampling)


def insert_word(prompt: str, word: str, rng: random.Random) -> str:
    """``word`` inserted at a uniformly random boundary of ``prompt`` split on single spaces."""
    words = prompt.split(" ")
    # one of the len(words) + 1 boundaries, both ends included   (DCR's insert_rand_word)
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def _insert_words(prompt: str, words: list[str], rng: random.Random) -> str:
    """The prompt with each word inserted in turn at a random position."""
    for word in words:
        prompt = insert_word(prompt, word, rng)
    return prompt


def _sample_perturbed(
    denoiser: Denoiser,
    perturbed: list[str],
    inserted: list[list[str]],
    seeds: Sequence[int],
    sampling: SamplingOptions,
) -> Mitigated:
    """Plain sampling from the perturbed prompts; ``extras["inserted"]`` holds each sample's words."""
    latents = sample(denoiser, denoiser.encode(perturbed), seeds, **sampling.sample_kwargs())
    return sampled(
        denoiser, sampling, latents, perturbed, sampling.num_inference_steps, extras={"inserted": inserted}
    )


def _random_token(tokenizer, special: set[int], rng: random.Random) -> str:
    """A non-special vocabulary token decoded to one word (tokens decoding to whitespace are redrawn)."""
    while True:
        token = rng.randrange(tokenizer.vocab_size)
        if token in special:
            continue
        word = tokenizer.decode([token])
        if word and not any(c.isspace() for c in word):
            return word


def _stream(seed: int) -> random.Random:
    """The random stream of one sample's perturbation."""
    return random.Random(int(seed))


def _tokenizer(denoiser: Denoiser, method: str):
    """The text model's (first) tokenizer; text perturbations need a text-conditioned model."""
    tokenizer = denoiser.tokenizer
    if denoiser.conditioning != "text" or tokenizer is None:
        raise DiffmemError(
            f"{method} perturbs prompt text and needs a text-conditioned model; {denoiser.family} is "
            f"conditioned on {denoiser.conditioning!r}"
        )
    return tokenizer


def _check_batch(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if isinstance(prompts, str):
        raise DiffmemError("prompts must be a list of strings, one per sample; got a single string")
    if len(prompts) != len(seeds):
        raise DiffmemError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per sample")


def _check_insertions(insertions: int) -> None:
    if insertions < 1:
        raise DiffmemError(f"insertions must be at least 1; got {insertions}")

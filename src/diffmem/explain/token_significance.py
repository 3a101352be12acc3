"""Token significance (Wen et al., ICLR 2024; SPEC §2): how much each token's text embedding moves the
noise-norm memorization score, mapped back to the words of the prompt.

The score L is ``||eps(x_t, e_prompt) - eps(x_t, e_null)||_2`` summed over generations on the ordinary
CFG trajectory; token i's significance is ``||dL/de_i||_2`` over the embedding width, averaged over
the chosen steps and generations. Start, end and padding tokens are left out.

``e_i`` is, by default, position i of the text encoder's output (the UNet's conditioning), as in
Wen et al.'s code. A causal text encoder (CLIP's) carries what a word says into every later position,
so there later words can take a word's significance; ``attribute_to="token_embeddings"`` takes e_i
at the text encoder's input instead, where each position holds its own token only.

``attribute_to="word_replacement"`` measures instead of differentiating, with the same seeds and steps:
a word's significance is how much the score falls when the word is replaced by a plain word, plus the
score of the word alone as a prompt. These are a Shapley value's two end terms, the word's contribution
to all the other words and to none (the empty prompt scores 0: it is the unconditional one). The first
alone misses a trigger of several words, any one of which carries the memory (replacing one word of a
two-word title hardly lowers the score); the second alone misses a word that recalls an image only in
its context. Two noise-norm evaluations per word, the same whatever the text encoder does with positions.

Punctuation marks are shown with their significance but ranked after every word: an explanation names
words, and putting a word where a mark stood tests a new sentence, not the mark (word replacement gives
marks 0).

Given the significance each word has in ordinary prompts (:mod:`ordinary_significance`), word
replacement weighs a word by what it adds beyond that: the significance less the ordinary one, at least
0.

Given the threshold a prompt is flagged above, word replacement ranks a word whose replacement alone
takes the flagged prompt to the threshold or under before the others (by significance within each
part): the end terms weigh a word by how much it moves the score, and a title word that alone recalls
the image can outweigh the other title word, the one whose replacement ends the flag.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import torch

from diffmem.core.denoiser import Denoiser, require_start_token
from diffmem.detect.detector import check_guidance, check_trajectory, detection_seeds
from diffmem.detect.noise_norm import NoiseNormConfig, difference_magnitude, noise_norm
from diffmem.errors import DiffmemError
from diffmem.io.prompts import encoding_problem
from diffmem.sampling import StepState, sample

if TYPE_CHECKING:
    from diffmem.explain.ordinary_significance import OrdinarySignificance


@dataclass(frozen=True)
class SignificanceConfig:
    """Where to measure (defaults: the first of 50 DDIM steps, one generation, CFG 7.5)."""

    num_inference_steps: int = 50
    steps: int | None = 1  # the first `steps` steps; None: all of them
    n_generations: int = 1
    guidance_scale: float = 7.5
    base_seed: int = 0
    # or "token_embeddings" (the text encoder's input), or "word_replacement" (measured; see module doc)
    attribute_to: str = "prompt_embeds"
    centered: bool = True  # the score explained: the noise norm's (see diffmem.detect.noise_norm)

    def __post_init__(self) -> None:
        check_trajectory(self.num_inference_steps, self.steps, self.n_generations, self.guidance_scale)
        if self.attribute_to not in ATTRIBUTION_TARGETS:
            raise DiffmemError(
                f"unknown attribution target {self.attribute_to!r}; use one of {ATTRIBUTION_TARGETS}"
            )

    def noise_norm_config(self) -> NoiseNormConfig:
        """The noise-norm detector measuring the same score (same steps, generations, guidance and seed)."""
        return NoiseNormConfig(
            num_inference_steps=self.num_inference_steps,
            steps=self.steps,
            n_generations=self.n_generations,
            guidance_scale=self.guidance_scale,
            base_seed=self.base_seed,
            centered=self.centered,
        )


ATTRIBUTION_TARGETS = ("prompt_embeds", "token_embeddings", "word_replacement")
REPLACEMENT = "object"  # a plain in-grammar-looking word put where a word is taken out


def replace_spans(prompt: str, spans: Sequence[tuple[int, int]], replacement: str) -> str:
    """``prompt`` with each of its (non-overlapping) character spans replaced by ``replacement``."""
    for start, end in sorted(spans, reverse=True):  # from the right, so the spans before stay where they were
        prompt = prompt[:start] + replacement + prompt[end:]
    return prompt


def is_word(text: str) -> bool:
    """Whether a piece of a prompt is a word (holds a letter or digit) rather than punctuation."""
    return any(c.isalnum() for c in text)


@dataclass(frozen=True)
class TokenSignificance:
    """A prompt's tokens and words with their significance for its memorization score."""

    prompt: str
    score: float  # the noise-norm score over the same steps and generations
    tokens: list[str]  # BPE pieces of the prompt (no start, end or padding tokens)
    token_scores: list[float]
    words: list[str]  # the prompt's text of each word (BPE pieces merged)
    word_spans: list[tuple[int, int]]  # character span of each word in the prompt
    word_scores: list[float]  # ||dL/de_w|| over all the word's token embeddings: sqrt(sum of squares)
    truncated: bool = False  # the prompt had more tokens than the text encoder reads
    token_words: list[int] = field(default_factory=list)  # word index of each token
    # word replacement only: the score with each word replaced, and of each word alone (None for a mark)
    scores_without: list[float | None] | None = None
    scores_alone: list[float | None] | None = None
    # with ordinary prompts' significance: what each word has there (None for a mark), taken from its own
    ordinary: list[float | None] | None = None

    @property
    def normalized(self) -> list[float]:
        """Word significances scaled to sum to 1 (for display)."""
        total = sum(self.word_scores)
        return [s / total if total > 0 else 0.0 for s in self.word_scores]

    def replaced(self, words: int | Sequence[int], replacement: str) -> str:
        """The prompt with word ``words`` (an index, or several) replaced by ``replacement`` each (an edit
        that tests them)."""
        chosen = {words} if isinstance(words, int) else set(words)
        return replace_spans(self.prompt, [self.word_spans[w] for w in chosen], replacement)

    def ranking(self, threshold: float | None = None) -> list[int]:
        """Word indices from most to least significant, punctuation marks after the words. Given the
        threshold a prompt is flagged above, a word whose replacement alone takes a flagged prompt to it or
        under (measured by word replacement) ranks before every word whose replacement does not."""
        return sorted(
            range(len(self.words)),
            key=lambda i: (not is_word(self.words[i]), not self.unflags(i, threshold), -self.word_scores[i]),
        )

    def unflags(self, word: int, threshold: float | None) -> bool:
        """Whether replacing ``word`` alone was measured to take the flagged prompt to ``threshold`` or
        under."""
        if threshold is None or self.score <= threshold or self.scores_without is None:
            return False
        without = self.scores_without[word]
        return without is not None and without <= threshold

    def to_table(self) -> pa.Table:
        """One row per word: word, character span, significance, normalized significance (and, measured
        by word replacement, the score with the word replaced and of the word alone)."""
        columns = {
            "word": self.words,
            "start": [s for s, _ in self.word_spans],
            "end": [e for _, e in self.word_spans],
            "significance": self.word_scores,
            "normalized": self.normalized,
        }
        if self.scores_without is not None:
            columns |= {"score_without": self.scores_without, "score_alone": self.scores_alone}
        if self.ordinary is not None:
            columns |= {"ordinary": self.ordinary}
        return pa.table(columns)

    def plot(self, path: Path) -> Path:
        """A bar chart of the words' normalized significance, saved as PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(max(4.0, 0.45 * len(self.words)), 3.0))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.bar(range(len(self.words)), self.normalized, color="tab:red")
        axes.set_xticks(range(len(self.words)), self.words, rotation=60, ha="right", fontsize=8)
        axes.set_ylabel("significance (share)")
        axes.set_title(f"noise-norm score {self.score:.3f}")
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=120)
        return Path(path)


class _GradientTrace:
    """Observer accumulating ``dL/de`` (for each tensor in ``embeds``, [B, L, D]) and L at every step."""

    needs_grad = True

    def __init__(self, embeds: list[torch.Tensor], shared_graph: bool, centered: bool) -> None:
        self.embeds = embeds
        self.shared_graph = (
            shared_graph  # the embeds come out of a graph every step reuses (the text encoder)
        )
        self.centered = centered
        self.gradients: list[torch.Tensor] = []  # [B, L] per step: norm over the embedding width
        self.norms: list[torch.Tensor] = []  # [B] per step

    def __call__(self, step: StepState) -> None:
        # L: the noise norm of each generation (Wen et al., eq. 4; centred unless told), summed over the batch
        norms = difference_magnitude(step.eps_cond - step.eps_uncond, self.centered)
        gradients = torch.autograd.grad(norms.sum(), self.embeds, retain_graph=self.shared_graph)
        # significance of token i: ||dL/de_i||_2 over the embedding width (Wen et al., Sec. 4), and
        # over every text encoder's e_i together (SDXL has two)
        squares = sum(g.float().square().sum(dim=-1) for g in gradients)
        self.gradients.append(squares.sqrt().detach().cpu())
        self.norms.append(norms.detach().cpu())


def explainable(denoiser: Denoiser) -> bool:
    """Whether token significance can explain this model's prompts: a text-conditioned model whose
    tokenizer puts a start token before the prompt, as CLIP's does."""
    tokenizer = denoiser.tokenizer
    return denoiser.conditioning == "text" and tokenizer is not None and tokenizer.bos_token_id is not None


def check_explainable(denoiser: Denoiser, prompt: str) -> None:
    """Raise, in one line, unless token significance can explain ``prompt`` on this model."""
    if denoiser.tokenizer is None or denoiser.conditioning != "text":
        raise DiffmemError(
            f"token significance needs a text-conditioned model with a tokenizer; {denoiser.family} is "
            f"conditioned on {denoiser.conditioning!r}"
        )
    require_start_token(denoiser, "token significance")
    if not prompt.strip():
        raise DiffmemError("the prompt is empty: there is nothing to explain")
    problem = encoding_problem(prompt)
    if problem is not None:
        raise DiffmemError(f"prompt {prompt[:60]!a} is not valid text: {problem}")


def token_significance(
    denoiser: Denoiser,
    prompt: str,
    config: SignificanceConfig = SignificanceConfig(),
    prompt_id: int = 0,
    ordinary: OrdinarySignificance | None = None,
) -> TokenSignificance:
    """Significance of every token and word of ``prompt`` for its memorization score; by word replacement
    and given ``ordinary`` prompts' significance, beyond each word's there."""
    check_guidance("token significance", config.guidance_scale)
    check_explainable(denoiser, prompt)
    tokenizer = denoiser.tokenizer
    if config.attribute_to == "word_replacement":
        return _replacement_significance(denoiser, prompt, config, prompt_id, ordinary)
    if ordinary is not None:
        raise DiffmemError("ordinary prompts' significance is measured by word replacement only")
    n = config.n_generations
    if config.attribute_to == "token_embeddings":
        with _token_embedding_leaves(denoiser.text_encoders) as embeds:
            cond = denoiser.encode([prompt] * n, differentiable=True)
    else:
        cond = denoiser.encode([prompt]).repeat_interleave(n)
        embeds = [cond["prompt_embeds"].detach().clone().requires_grad_(True)]
        cond = cond.replace(prompt_embeds=embeds[0])
    trace = _GradientTrace(embeds, config.attribute_to == "token_embeddings", config.centered)
    sample(
        denoiser,
        cond,
        detection_seeds(config.base_seed, [prompt_id], n),
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        observers=[trace],
        max_steps=config.steps,
    )
    per_token = torch.stack(trace.gradients).mean(dim=(0, 1))  # mean over steps and generations: [L]
    score = float(torch.stack(trace.norms).mean())
    return _words(prompt, tokenizer, per_token, score)


def _replacement_significance(
    denoiser: Denoiser,
    prompt: str,
    config: SignificanceConfig,
    prompt_id: int,
    ordinary: OrdinarySignificance | None,
) -> TokenSignificance:
    """Each word's significance: the fall of the score when it is replaced by a plain word, plus its score
    alone, less its significance in ``ordinary`` prompts when given (at least 0; a punctuation mark: 0)."""
    if ordinary is not None:
        ordinary.check(config)
    measure = config.noise_norm_config()
    score = float(noise_norm(denoiser, [prompt], measure, prompt_ids=[prompt_id]).scores[0])  # checks it too
    parsed = prompt_words(prompt, denoiser.tokenizer, denoiser.tokenizer.model_max_length)
    words = [i for i, word in enumerate(parsed.words) if is_word(word)]
    edits = [replace_spans(prompt, [parsed.spans[i]], REPLACEMENT) for i in words]
    edits += [parsed.words[i] for i in words]
    measured = (
        noise_norm(denoiser, edits, measure, prompt_ids=[prompt_id] * len(edits)).scores.tolist()
        if edits
        else []
    )
    falls = [0.0] * len(parsed.words)
    scores_without: list[float | None] = [None] * len(parsed.words)
    scores_alone: list[float | None] = [None] * len(parsed.words)
    usual: list[float | None] = [None] * len(parsed.words)
    for i, without, alone in zip(words, measured[: len(words)], measured[len(words) :]):
        falls[i] = max(score - without + alone, 0.0)  # the Shapley value's end terms (module doc)
        scores_without[i], scores_alone[i] = without, alone
        if ordinary is not None:
            usual[i] = ordinary.of(parsed.words[i])
            falls[i] = max(falls[i] - usual[i], 0.0)
    return TokenSignificance(
        prompt=prompt,
        score=score,
        tokens=[p.removesuffix("</w>") for p in parsed.pieces],
        token_scores=[falls[word] for word in parsed.token_words],
        words=parsed.words,
        word_spans=parsed.spans,
        word_scores=falls,
        truncated=parsed.truncated,
        token_words=parsed.token_words,
        scores_without=scores_without,
        scores_alone=scores_alone,
        ordinary=usual if ordinary is not None else None,
    )


@contextmanager
def _token_embedding_leaves(encoders: list[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """While open, each text encoder's token-embedding output becomes a new leaf that requires grad,
    collected in the yielded list (the encoders' inputs, as the gradient target)."""
    leaves: list[torch.Tensor] = []

    def as_leaf(module, inputs, output: torch.Tensor) -> torch.Tensor:
        leaves.append(output.detach().requires_grad_(True))
        return leaves[-1]

    handles = [e.get_input_embeddings().register_forward_hook(as_leaf) for e in encoders]
    try:
        yield leaves
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class PromptWords:
    """A prompt's own tokens (as the text encoder reads them) grouped into words."""

    pieces: list[str]  # BPE pieces, no start, end or padding tokens; positions 1..len in the encoder
    token_words: list[int]  # word index of each piece
    words: list[str]
    spans: list[tuple[int, int]]  # character span of each word in the prompt
    truncated: bool  # the prompt had more tokens than the encoder reads


def prompt_words(prompt: str, tokenizer, length: int) -> PromptWords:
    """The words of ``prompt`` for a text encoder reading ``length`` positions (start and end included)."""
    encoding = tokenizer(prompt, return_offsets_mapping=True, truncation=False)
    ids = encoding["input_ids"][1:-1]  # without the start and end tokens
    offsets = encoding["offset_mapping"][1:-1]
    kept = min(len(ids), length - 2)  # positions 1..length-2 hold prompt tokens; the rest was cut off
    pieces = tokenizer.convert_ids_to_tokens(ids[:kept])
    token_words, words, spans, start = [], [], [], None
    for index, (piece, (begin, end)) in enumerate(zip(pieces, offsets)):
        start = begin if start is None else start
        token_words.append(len(words))
        if piece.endswith("</w>") or index == kept - 1:  # CLIP BPE marks the last piece of a word
            words.append(prompt[start:end])
            spans.append((start, end))
            start = None
    return PromptWords(pieces, token_words, words, spans, len(ids) > kept)


def _words(prompt: str, tokenizer, per_token: torch.Tensor, score: float) -> TokenSignificance:
    """Token scores of the prompt's own tokens, merged into words with their character spans."""
    parsed = prompt_words(prompt, tokenizer, per_token.shape[0])
    token_scores = per_token[1 : len(parsed.pieces) + 1].tolist()
    squares = [0.0] * len(parsed.words)
    for word, value in zip(parsed.token_words, token_scores):
        squares[word] += value**2
    return TokenSignificance(
        prompt=prompt,
        score=score,
        tokens=[p.removesuffix("</w>") for p in parsed.pieces],
        token_scores=token_scores,
        words=parsed.words,
        word_spans=parsed.spans,
        word_scores=[total**0.5 for total in squares],
        truncated=parsed.truncated,
        token_words=parsed.token_words,
    )

"""Token significance (Wen et al., ICLR 2024; SPEC §2): how much each token's text embedding moves the
noise-norm memorization score, mapped back to the words of the prompt.

The score L is ``||eps(x_t, e_prompt) - eps(x_t, e_null)||_2`` summed over generations on the ordinary
CFG trajectory; token i's significance is ``||dL/de_i||_2`` over the embedding width, averaged over
the chosen steps and generations. Start, end and padding tokens are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from diffmem.denoiser import Denoiser
from diffmem.detect.detector import check_guidance, detection_seeds
from diffmem.errors import DiffmemError
from diffmem.sampling import StepState, sample


@dataclass(frozen=True)
class SignificanceConfig:
    """Where to measure (defaults: the first of 50 DDIM steps, one generation, CFG 7.5)."""

    num_inference_steps: int = 50
    steps: int | None = 1  # the first `steps` steps; None: all of them
    n_generations: int = 1
    guidance_scale: float = 7.5
    base_seed: int = 0


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

    @property
    def normalized(self) -> list[float]:
        """Word significances scaled to sum to 1 (for display)."""
        total = sum(self.word_scores)
        return [s / total if total > 0 else 0.0 for s in self.word_scores]

    def ranking(self) -> list[int]:
        """Word indices from most to least significant."""
        return sorted(range(len(self.words)), key=lambda i: -self.word_scores[i])

    def to_table(self) -> pa.Table:
        """One row per word: word, character span, significance, normalized significance."""
        return pa.table(
            {
                "word": self.words,
                "start": [s for s, _ in self.word_spans],
                "end": [e for _, e in self.word_spans],
                "significance": self.word_scores,
                "normalized": self.normalized,
            }
        )

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
    """Observer accumulating ``dL/d prompt_embeds`` and L at every step it sees."""

    needs_grad = True

    def __init__(self, embeds: torch.Tensor) -> None:
        self.embeds = embeds
        self.gradients: list[torch.Tensor] = []  # [B, L] per step: norm over the embedding width
        self.norms: list[torch.Tensor] = []  # [B] per step

    def __call__(self, step: StepState) -> None:
        # L = ||eps(x_t, e_p) - eps(x_t, e_null)||_2 per generation (Wen et al., eq. 4), summed over the batch
        norms = (step.eps_cond - step.eps_uncond).flatten(1).float().norm(dim=1)
        (gradient,) = torch.autograd.grad(norms.sum(), self.embeds)
        # significance of token i: ||dL/de_i||_2 over the embedding width (Wen et al., Sec. 4)
        self.gradients.append(gradient.float().norm(dim=-1).detach().cpu())
        self.norms.append(norms.detach().cpu())


def token_significance(
    denoiser: Denoiser, prompt: str, config: SignificanceConfig = SignificanceConfig(), prompt_id: int = 0
) -> TokenSignificance:
    """Significance of every token and word of ``prompt`` for its memorization score."""
    check_guidance("token significance", config.guidance_scale)
    tokenizer = getattr(getattr(denoiser, "pipeline", None), "tokenizer", None)
    if tokenizer is None or denoiser.conditioning != "text":
        raise DiffmemError("token significance needs a text-conditioned model with a tokenizer")
    if not prompt.strip():
        raise DiffmemError("the prompt is empty: there is nothing to explain")
    n = config.n_generations
    cond = denoiser.encode([prompt]).repeat_interleave(n)
    embeds = cond["prompt_embeds"].detach().clone().requires_grad_(True)
    trace = _GradientTrace(embeds)
    sample(
        denoiser,
        cond.replace(prompt_embeds=embeds),
        detection_seeds(config.base_seed, [prompt_id], n),
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        observers=[trace],
        max_steps=config.steps,
    )
    per_token = torch.stack(trace.gradients).mean(dim=(0, 1))  # mean over steps and generations: [L]
    score = float(torch.stack(trace.norms).mean())
    return _words(prompt, tokenizer, per_token, score)


def _words(prompt: str, tokenizer, per_token: torch.Tensor, score: float) -> TokenSignificance:
    """Token scores of the prompt's own tokens, merged into words with their character spans."""
    encoding = tokenizer(prompt, return_offsets_mapping=True, truncation=False)
    limit = per_token.shape[0]
    ids = encoding["input_ids"][1:-1]  # without the start and end tokens
    offsets = encoding["offset_mapping"][1:-1]
    kept = min(len(ids), limit - 2)  # positions 1..limit-2 hold prompt tokens; the rest was cut off
    pieces = tokenizer.convert_ids_to_tokens(ids[:kept])
    token_scores = per_token[1 : kept + 1].tolist()
    words, spans, word_scores, token_words = [], [], [], []
    start = None
    for piece, (begin, end), value in zip(pieces, offsets, token_scores):
        if start is None:
            start, total = begin, 0.0
        total += value**2
        token_words.append(len(words))
        if piece.endswith("</w>"):  # CLIP BPE marks the last piece of a word
            words.append(prompt[start:end])
            spans.append((start, end))
            word_scores.append(total**0.5)
            start = None
    if start is not None:  # a word cut by truncation
        end = offsets[kept - 1][1]
        words.append(prompt[start:end])
        spans.append((start, end))
        word_scores.append(total**0.5)
    return TokenSignificance(
        prompt=prompt,
        score=score,
        tokens=[p.removesuffix("</w>") for p in pieces],
        token_scores=token_scores,
        words=words,
        word_spans=spans,
        word_scores=word_scores,
        truncated=len(ids) > kept,
        token_words=token_words,
    )

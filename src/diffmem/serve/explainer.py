"""One model, loaded once, scoring and explaining prompts one request at a time in arrival order."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from diffmem.core.denoiser import Denoiser
from diffmem.errors import DiffmemError
from diffmem.explain import SignificanceConfig, token_significance
from diffmem.explain.carrying_words import carrying_verdict, carrying_words
from diffmem.explain.ordinary_significance import OrdinarySignificance
from diffmem.io.prompts import encoding_problem
from diffmem.report.html import png
from diffmem.sampling import generate

MAX_PROMPT_CHARS = 2000

T = TypeVar("T")


class QueueFull(DiffmemError):
    """More requests are waiting for the model than the explainer accepts."""


class PromptExplainer:
    """Explanations and thumbnails of prompts from one model, computed on a single worker thread.

    ``load`` opens the model on the worker thread, so all tensor work happens on that one thread (on CPU,
    OpenMP runs several times slower once two threads have used it). Requests from any number of
    threads queue for the worker, so the model never runs two at once; at most ``max_pending`` may wait
    or run, later ones get :class:`QueueFull`. ``ordinary``, when given, measures (or reads) the model's
    ordinary prompts' word significance on the worker once the model is open; words are weighed beyond it.
    """

    def __init__(
        self,
        load: Callable[[], Denoiser],
        config: SignificanceConfig | None = None,
        threshold: float | None = None,
        model_name: str = "",
        thumbnails: bool = True,
        max_pending: int = 8,
        ordinary: Callable[[Denoiser], OrdinarySignificance] | None = None,
    ) -> None:
        if max_pending < 1:
            raise DiffmemError(f"max_pending must be at least 1; got {max_pending}")
        self.config = config or SignificanceConfig()
        self.threshold = threshold
        self.model_name = model_name
        self.thumbnails = thumbnails
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffmem-model")
        self._slots = threading.BoundedSemaphore(max_pending)
        self.denoiser = self._worker.submit(load).result()
        self.ordinary = None if ordinary is None else self._worker.submit(ordinary, self.denoiser).result()

    def info(self) -> dict[str, Any]:
        """What the page shows about the model and the settings."""
        return {
            "model": self.model_name,
            "threshold": self.threshold,
            "thumbnails": self.thumbnails,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "settings": {
                "num_inference_steps": self.config.num_inference_steps,
                "first_steps": self.config.steps,
                "n_generations": self.config.n_generations,
                "guidance_scale": self.config.guidance_scale,
                "seed": self.config.base_seed,
                "attribute_to": self.config.attribute_to,
                "ordinary_prompts": None if self.ordinary is None else self.ordinary.prompts,
            },
        }

    def explain(self, prompt: str) -> dict[str, Any]:
        """The prompt's noise-norm score, its flag against the threshold, every word's significance and,
        when flagged, the words that carry it (:mod:`carrying_words`)."""
        _check_prompt(prompt)
        started = time.perf_counter()
        result = self.run(token_significance, self.denoiser, prompt, self.config, ordinary=self.ordinary)
        flagged = None if self.threshold is None else result.score > self.threshold
        carrying = None
        if flagged:
            measure = self.config.noise_norm_config()
            found = self.run(carrying_words, self.denoiser, result, self.threshold, measure)
            named = found.named(result)
            carrying = {"words": named, "scores": found.scores, "text": carrying_verdict(named, found.scores)}
        words = [
            {"text": word, "start": start, "end": end, "significance": score, "share": share}
            for word, (start, end), score, share in zip(
                result.words, result.word_spans, result.word_scores, result.normalized
            )
        ]
        ranking = result.ranking(self.threshold)
        return {
            "prompt": prompt,
            "score": result.score,
            "threshold": self.threshold,
            "flagged": flagged,
            "truncated": result.truncated,
            "words": words,
            "top_word": result.words[ranking[0]] if ranking else None,
            "carrying": carrying,
            "elapsed_s": time.perf_counter() - started,
        }

    def thumbnail(self, prompt: str) -> dict[str, Any]:
        """One image generated from the prompt with the explanation's seed, as a base64 PNG."""
        _check_prompt(prompt)
        if not self.thumbnails:
            raise DiffmemError("thumbnails are switched off for this server")
        started = time.perf_counter()
        images = self.run(
            generate,
            self.denoiser,
            [prompt],
            base_seed=self.config.base_seed,
            num_inference_steps=self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale,
        ).images
        encoded = base64.b64encode(png(images[0], scale=max(1, 256 // images.shape[-1]))).decode("ascii")
        return {"prompt": prompt, "png": encoded, "elapsed_s": time.perf_counter() - started}

    def close(self) -> None:
        """Finish the running request and stop the worker."""
        self._worker.shutdown(wait=True, cancel_futures=True)

    def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``function`` on the model's worker thread and wait for it, if a queue slot is free."""
        if not self._slots.acquire(blocking=False):
            raise QueueFull("the model is busy with other requests; try again in a moment")
        try:
            return self._worker.submit(function, *args, **kwargs).result()
        finally:
            self._slots.release()


def _check_prompt(prompt: Any) -> None:
    if not isinstance(prompt, str):
        raise DiffmemError("the prompt must be a string")
    if not prompt.strip():
        raise DiffmemError("the prompt is empty: there is nothing to explain")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DiffmemError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    problem = encoding_problem(prompt)
    if problem is not None:
        raise DiffmemError(f"the prompt is not valid text: {problem}")

"""What every diffusers-backed denoiser shares: the schedule, prediction-type conversion, input checks."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from transformers import PreTrainedTokenizerBase

from diffmem.core.condition import Condition
from diffmem.core.denoiser import Conditioning, Prediction, TextAttention, eps_from_model_output
from diffmem.errors import DiffmemError

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DiffusersDenoiser:
    """Base of the adapters: wraps a pipeline's components, never its ``__call__``."""

    family: str
    conditioning: Conditioning
    default_guidance_scale: float
    text_attention: TextAttention = "cross"

    def __init__(self, pipeline: DiffusionPipeline, network: torch.nn.Module) -> None:
        self.pipeline = pipeline
        self.network = network
        self.scheduler = pipeline.scheduler
        self.device = network.device
        self.dtype = network.dtype
        self._read_schedule()

    def _read_schedule(self) -> None:
        """The prediction type and the variance-preserving noise levels of the scheduler's training schedule."""
        config = self.scheduler.config
        if "prediction_type" not in config or "num_train_timesteps" not in config:
            raise DiffmemError(
                f"scheduler {type(self.scheduler).__name__} is not a DDPM-family scheduler; "
                "diffmem needs one with a beta schedule and a prediction_type (DDIM, DDPM, PNDM, Euler, ...)"
            )
        self.prediction_type = config.prediction_type
        if self.prediction_type not in SUPPORTED_PREDICTION_TYPES:
            raise DiffmemError(
                f"prediction type {self.prediction_type!r} is not supported; use one of {SUPPORTED_PREDICTION_TYPES}"
            )
        alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        # sigma_t = sqrt((1 - abar_t) / abar_t), the VE noise level of timestep t
        self._sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The pipeline's (first) tokenizer; None for models not conditioned on text."""
        return getattr(self.pipeline, "tokenizer", None) if self.conditioning == "text" else None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders, in the order it concatenates their outputs."""
        names = ("text_encoder", "text_encoder_2") if self.conditioning == "text" else ()
        return [e for e in (getattr(self.pipeline, name, None) for name in names) if e is not None]

    @property
    def num_train_timesteps(self) -> int:
        """Length of the training schedule (1000 for Stable Diffusion)."""
        return int(self.scheduler.config.num_train_timesteps)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_bar_t`` of the training schedule; fractional t interpolates sigma linearly, as Euler does."""
        t = torch.as_tensor(t)
        t64 = t.detach().to("cpu", torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t64.floor().long()
        high = (low + 1).clamp(max=self.num_train_timesteps - 1)
        frac = t64 - low
        sigma = (1 - frac) * self._sigmas[low] + frac * self._sigmas[high]
        return (1 / (1 + sigma**2)).to(device=t.device, dtype=torch.float32)

    def timestep_options(self, num_inference_steps: int) -> dict:
        """None: noise-prediction schedulers are set by the number of steps alone."""
        return {}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> Prediction:
        """Noise prediction (and learned variance, if the network outputs one) for a batch."""
        self._check_inputs(x_t, cond)
        output = self._forward(x_t, t, cond)
        variance = None
        if output.shape[1] == 2 * x_t.shape[1]:  # learned variance (iDDPM): [eps, v] stacked on channels
            output, variance = output.split(x_t.shape[1], dim=1)
        alpha_bar_t = _per_sample(self.alpha_bar(t).to(x_t.device), x_t)
        eps = eps_from_model_output(output, x_t, alpha_bar_t.to(output.dtype), self.prediction_type)
        return Prediction(eps=eps, variance=variance)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Noise prediction ``eps(x_t, t, cond)``, [B, C, H, W]."""
        return self.predict(x_t, t, cond).eps

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        raise NotImplementedError

    def _check_inputs(self, x_t: torch.Tensor, cond: Condition) -> None:
        if x_t.shape[0] != cond.batch_size:
            raise DiffmemError(f"x_t has batch {x_t.shape[0]} but the condition has {cond.batch_size}")
        if tuple(x_t.shape[1:2]) != self.sample_shape[:1]:
            raise DiffmemError(f"x_t has {x_t.shape[1]} channels; this model takes {self.sample_shape[0]}")
        for name, tensor in [("x_t", x_t), *cond.tensors.items()]:
            if tensor.device.type != self.device.type:
                raise DiffmemError(
                    f"{name} is on {tensor.device} but the model is on {self.device}; move it with .to({str(self.device)!r})"
                )
            if tensor.is_floating_point() and tensor.dtype != self.dtype:
                raise DiffmemError(
                    f"{name} is {tensor.dtype} but the model runs in {self.dtype}; cast it with .to({self.dtype})"
                )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError


def _per_sample(alpha_bar_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] alpha_bar broadcast against [B, C, H, W]."""
    return alpha_bar_t.reshape(-1, *([1] * (x.ndim - 1))) if alpha_bar_t.ndim else alpha_bar_t

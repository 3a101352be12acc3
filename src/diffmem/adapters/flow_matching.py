"""What flow-matching (rectified-flow) denoisers share: the flow schedule and velocity predictions.

A rectified-flow model (Liu et al. 2023; Esser et al. 2024 for SD3) is trained on
``x_t = (1 - sigma_t) x_0 + sigma_t eps`` with ``sigma_t = t / num_train_timesteps`` and predicts the
velocity ``v = eps - x_0``. The adapter reports v where noise-prediction adapters report eps (see
``diffmem.core.denoiser``), so guidance is ``v_u + s (v_c - v_u)`` as in the pipelines and Wen et al.'s
score is ``||v_c - v_u||``: at a fixed x_t, ``v_c - v_u = (eps_c - eps_u) / (1 - sigma_t) =
-(x0_c - x0_u) / sigma_t``, the text-conditional part of the prediction, defined at x_T (sigma = 1) too.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from diffmem.adapters.diffusers_base import DiffusersDenoiser
from diffmem.core.condition import Condition
from diffmem.core.denoiser import FLOW_PREDICTION, Prediction
from diffmem.errors import DiffmemError
from diffmem.sampling.schedulers import is_flow_matching


class FlowMatchingDenoiser(DiffusersDenoiser):
    """Base of the rectified-flow adapters: a flow-matching scheduler and a velocity-predicting network."""

    text_attention = "joint"

    def _read_schedule(self) -> None:
        if not is_flow_matching(self.scheduler):
            raise DiffmemError(
                f"{type(self.pipeline).__name__} has the scheduler {type(self.scheduler).__name__}; "
                "diffmem samples it with a flow-matching one (FlowMatchEulerDiscreteScheduler)"
            )
        self.prediction_type = FLOW_PREDICTION

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Flow noise level ``sigma_t = t / num_train_timesteps`` (float32, same shape and device as t)."""
        return torch.as_tensor(t).to(torch.float32) / self.num_train_timesteps

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """The variance-preserving ``alpha_bar`` with the flow's signal-to-noise ratio at t."""
        sigma = self.sigma(t).clamp(0, 1)
        # SNR of x_t = (1 - sigma) x0 + sigma eps is ((1 - sigma) / sigma)^2 = abar / (1 - abar)
        return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)

    def timestep_options(self, num_inference_steps: int) -> dict:
        """``mu`` from the image's token count when the scheduler shifts dynamically, as the pipelines set it."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        _, height, width = self.sample_shape
        patch = self.network.config.patch_size
        mu = calculate_shift(
            (height // patch) * (width // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        return {"mu": mu}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> Prediction:
        """Velocity ``v = eps - x0`` for a batch (in ``Prediction.eps``: the prediction guidance combines)."""
        self._check_inputs(x_t, cond)
        return Prediction(eps=self._forward(x_t, t, cond))

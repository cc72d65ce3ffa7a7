"""Flow matching (rectified flow, as in SD3): the straight path from data to noise.

x_σ = (1-σ)·x0 + σ·ε for σ in [0, 1]; the model predicts the velocity dx/dσ = ε - x0 and sampling
integrates it from σ = 1 (pure noise) down to σ = 0. There is no β chain: σ is continuous, and the
model is told σ·T (T = ``num_train_timesteps``), as diffusers tells it σ·1000, so its timestep
embedding sees the same range as a ddpm model's.

Training draws σ logit-normally (Esser et al. 2024, SD3): σ = sigmoid(m + s·n) with n ~ N(0, 1),
which spends most steps at middle noise levels, where the velocity is hardest to predict. Both
the training σ and the sampling grid then go through the resolution shift
σ ← k·σ/(1 + (k-1)·σ), which moves them towards noise (k > 1) for images whose many pixels keep
their content recognisable at a σ where a small image is already gone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.config import ScheduleConfig


class FlowMatchingSchedule:
    """The flow-matching counterpart of ``NoiseSchedule``: the noisy input, the target, the
    model's timestep, the training σ and the sampling grid of one config.

    Holds no tensors (σ is given, not looked up); ``device`` and ``dtype`` say where sampling
    draws its noise. A single σ (sampling) is a Python float, so no step reads the device.
    """

    def __init__(
        self,
        config: ScheduleConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if config.objective != "flow_matching":
            raise ValueError(
                f"FlowMatchingSchedule needs diffusion.objective=flow_matching, got "
                f"{config.objective!r}; build the schedule with make_schedule(config)."
            )
        self.config = config
        self._device = torch.device("cpu" if device is None else device)
        self._dtype = dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FlowMatchingSchedule:
        return FlowMatchingSchedule(
            self.config,
            device=self.device if device is None else device,
            dtype=self.dtype if dtype is None else dtype,
        )

    @property
    def objective(self) -> str:
        return self.config.objective

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    # The end of every sampling grid: clean data.
    clean_level = 0.0

    def shifted(self, sigma: Tensor) -> Tensor:
        """k·σ/(1 + (k-1)·σ): the identity at k = 1, and 0 and 1 stay put for any k."""
        shift = self.config.flow_shift
        return shift * sigma / (1 + (shift - 1) * sigma)

    def training_sigmas(self, normals: Tensor) -> Tensor:
        """σ (B,) in (0, 1) from standard-normal draws n (B,): shifted sigmoid(m + s·n)."""
        config = self.config
        return self.shifted(torch.sigmoid(config.flow_logit_mean + config.flow_logit_std * normals))

    def noise_to_signal(self, sigma: float) -> float:
        """σ/(1-σ), the noise level both objectives share (EDM's σ): ∞ at σ = 1."""
        return math.inf if sigma >= 1 else sigma / (1 - sigma)

    def q_sample(self, x0: Tensor, sigma: Tensor | float, noise: Tensor) -> Tensor:
        """x_σ = (1-σ)·x0 + σ·ε, per sample for a (B,) σ or one float for the whole batch."""
        if isinstance(sigma, Tensor):
            sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise

    def velocity(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The target dx_σ/dσ = ε - x0, the same at every σ of the straight path."""
        return noise - x0

    def model_timesteps(self, sigma: Tensor) -> Tensor:
        """The float timesteps (B,) the model is given: σ·T."""
        return sigma * self.num_train_timesteps

    def sampling_levels(self, steps: int) -> list[float]:
        """``steps`` descending σ, starting at 1: evenly spaced in unshifted σ from 1 to 1/T,
        then shifted (as diffusers' FlowMatchEulerDiscreteScheduler); the final step goes on to
        σ = 0 (``clean_level``).

        diffusers' own default grid ends at the *shifted* 1/T and shifts it again; the two grids
        are identical for k = 1, and for k > 1 ours stops one shift earlier, at k/(T + k - 1).
        """
        unshifted = torch.linspace(1, 1 / self.num_train_timesteps, steps, dtype=torch.float64)
        return self.shifted(unshifted).tolist()

"""The forward (noising) process: β_t, ᾱ_t and the conversions between ε, x0 and v.

Timesteps are 0-based: ``t`` in ``[0, T-1]`` and ``alphas_cumprod[t] = ∏_{s≤t} (1 - β_s)``.
Everything is computed in float64 and only then cast, so a float32 schedule and the float64 one
used by the tests agree to the last bit of float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.config import ScheduleConfig
from ldm.diffusion.timesteps import sampling_timesteps

# Improved DDPM's cosine schedule: offset s keeps β_0 from being vanishingly small, and β is capped
# below 1 so that the last step does not divide by zero.
_COSINE_OFFSET = 0.008
_COSINE_MAX_BETA = 0.999


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Linear in √β, as latent diffusion uses: gentler at both ends than ``linear_betas``."""
    roots = torch.linspace(
        math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64
    )
    return roots**2


def cosine_betas(num_timesteps: int) -> Tensor:
    """β_t = 1 - ᾱ(t+1)/ᾱ(t) for ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), capped at 0.999."""
    fractions = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((fractions + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=_COSINE_MAX_BETA)


def rescale_to_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and stretch √ᾱ so that ᾱ_T = 0 while ᾱ_0 stays put (Lin et al. 2023, Algorithm 1).

    With ᾱ_T = 0 the last training step sees pure noise, exactly what sampling starts from.
    """
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    alpha_bar = ((sqrt_alpha_bar - last) * first / (first - last)) ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def betas_from_config(config: ScheduleConfig) -> Tensor:
    """The float64 β_t, t = 0..T-1, that ``config`` describes."""
    steps = config.num_train_timesteps
    if config.beta_schedule == "cosine":
        betas = cosine_betas(steps)
    elif config.beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(steps, *config.beta_range)
    else:
        betas = linear_betas(steps, *config.beta_range)
    return rescale_to_zero_terminal_snr(betas) if config.rescale_zero_terminal_snr else betas


class NoiseSchedule:
    """β_t, ᾱ_t and SNR_t of one config, plus the maths that only depends on them.

    A plain object rather than an ``nn.Module``: Lightning's precision plugins would cast module
    buffers to bf16/fp16, and ᾱ near 0 or 1 does not survive that. Checkpoints carry the config.

    Per-sample timesteps (a (B,) tensor, as in training) gather the coefficients on the device,
    cast to the dtype of the tensor they multiply. A single integer timestep (sampling) reads a
    host copy instead and multiplies by a Python float: reading a CUDA tensor's value would make
    the host wait for the device several times per sampling step. The host copy holds exactly the
    values of the device tensors (rounded to ``dtype`` first), so a read gives the same number.
    """

    def __init__(
        self,
        config: ScheduleConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config if config is not None else ScheduleConfig()
        if self.config.objective != "ddpm":
            raise ValueError(
                f"NoiseSchedule is the ddpm chain, but diffusion.objective="
                f"{self.config.objective!r}; build the schedule with make_schedule(config)."
            )
        betas = betas_from_config(self.config)  # float64 until the very end
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)

        def store(values: Tensor) -> Tensor:
            return values.to(device=device, dtype=dtype)

        self.betas = store(betas)
        self.alphas = store(1 - betas)
        self.alphas_cumprod = store(alphas_cumprod)
        self.snr = store(alphas_cumprod / (1 - alphas_cumprod))
        self.sqrt_alphas_cumprod = store(alphas_cumprod.sqrt())
        self.sqrt_one_minus_alphas_cumprod = store((1 - alphas_cumprod).sqrt())
        # Built before anything reaches the device, so reading them never synchronises.
        self._host_alphas_cumprod = _host_floats(alphas_cumprod, dtype)
        self._host_sqrt_alphas_cumprod = _host_floats(alphas_cumprod.sqrt(), dtype)
        self._host_sqrt_one_minus_alphas_cumprod = _host_floats((1 - alphas_cumprod).sqrt(), dtype)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> NoiseSchedule:
        """A copy on ``device`` in ``dtype``, recomputed from the config (never an upcast)."""
        return NoiseSchedule(
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
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def dtype(self) -> torch.dtype:
        return self.betas.dtype

    # The end of every sampling grid: t = -1, the clean end of the chain.
    clean_level = -1

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timesteps (B,) the model is given: the integer t itself."""
        return t

    def sampling_levels(self, steps: int) -> list[int]:
        """The ``steps`` descending timesteps a sampler visits (``sampling_timesteps``)."""
        return sampling_timesteps(self.num_train_timesteps, steps).tolist()

    def alpha_bar(self, t: int) -> float:
        """ᾱ at integer timestep ``t``; t = -1 stands for the clean end of the chain (ᾱ = 1)."""
        if t == -1:
            return 1.0
        self._check_timestep(t)
        return self._host_alphas_cumprod[t]

    def noise_to_signal(self, t: int) -> float:
        """√((1-ᾱ_t)/ᾱ_t), the noise level both objectives share (EDM's σ): ∞ where ᾱ_t = 0."""
        alpha_bar = self.alpha_bar(t)
        return math.inf if alpha_bar == 0 else math.sqrt((1 - alpha_bar) / alpha_bar)

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t · x0 + √(1-ᾱ_t) · ε: a draw from q(x_t | x0) for the given noise."""
        signal, noise_level = self._signal_and_noise_levels(t, x0)
        return signal * x0 + noise_level * noise

    def velocity(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """v = √ᾱ_t · ε - √(1-ᾱ_t) · x0, the v-prediction target (Salimans & Ho 2022)."""
        signal, noise_level = self._signal_and_noise_levels(t, x0)
        return signal * noise - noise_level * x0

    def x0_from_epsilon(self, x_t: Tensor, t: Tensor | int, epsilon: Tensor) -> Tensor:
        signal, noise_level = self._signal_and_noise_levels(t, x_t)
        return (x_t - noise_level * epsilon) / signal

    def epsilon_from_x0(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        signal, noise_level = self._signal_and_noise_levels(t, x_t)
        return (x_t - signal * x0) / noise_level

    def x0_from_velocity(self, x_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        signal, noise_level = self._signal_and_noise_levels(t, x_t)
        return signal * x_t - noise_level * v

    def epsilon_from_velocity(self, x_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        signal, noise_level = self._signal_and_noise_levels(t, x_t)
        return signal * v + noise_level * x_t

    def x0_and_epsilon(
        self, model_output: Tensor, x_t: Tensor, t: Tensor | int
    ) -> tuple[Tensor, Tensor]:
        """Read a model output according to ``prediction_type``: the (x0, ε) it implies."""
        if self.prediction_type == "v_prediction":
            return (
                self.x0_from_velocity(x_t, t, model_output),
                self.epsilon_from_velocity(x_t, t, model_output),
            )
        return self.x0_from_epsilon(x_t, t, model_output), model_output

    def _signal_and_noise_levels(
        self, t: Tensor | int, like: Tensor
    ) -> tuple[Tensor, Tensor] | tuple[float, float]:
        """(√ᾱ_t, √(1-ᾱ_t)): per sample, shaped to broadcast over ``like``, for a (B,) tensor t;
        Python floats from the host copy for an integer t."""
        if isinstance(t, Tensor):
            return (
                _gather(self.sqrt_alphas_cumprod, t, like),
                _gather(self.sqrt_one_minus_alphas_cumprod, t, like),
            )
        self._check_timestep(t)
        return self._host_sqrt_alphas_cumprod[t], self._host_sqrt_one_minus_alphas_cumprod[t]

    def _check_timestep(self, t: int) -> None:
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(
                f"timestep t={t} is outside [0, {self.num_train_timesteps - 1}] "
                f"(T={self.num_train_timesteps}); timesteps are 0-based."
            )


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] on the device, shaped (B, 1, …) to broadcast over ``like`` and in its dtype."""
    picked = values[t.to(values.device)].reshape(-1, *([1] * (like.ndim - 1)))
    return picked.to(device=like.device, dtype=like.dtype)


def _host_floats(values: Tensor, dtype: torch.dtype) -> tuple[float, ...]:
    """CPU float64 ``values`` as Python floats, rounded to ``dtype`` first like the device copy."""
    return tuple(values.to(dtype).tolist())

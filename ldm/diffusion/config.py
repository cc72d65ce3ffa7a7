"""The diffusion section of the config (``conf/diffusion/default.yaml``), checked on construction.

Training and sampling read the same keys, so a checkpoint that stores this config reproduces the
exact schedule and objective it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ldm.config.parse import dataclass_from_dict

OBJECTIVES = ("ddpm", "flow_matching")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_WEIGHTINGS = ("mse", "min_snr")

# β endpoints that the literature quotes for T = 1000 steps (DDPM for linear, Stable Diffusion for
# scaled_linear). Defaults scale them by 1000/T, as improved DDPM does, so that a shorter chain
# destroys the signal just as completely: linear at T = 200 becomes 5e-4 → 0.1 with ᾱ_T ≈ 3e-5.
REFERENCE_TIMESTEPS = 1000
REFERENCE_BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}

_CONFIG_FILE = "conf/diffusion/default.yaml"


@dataclass(frozen=True)
class ScheduleConfig:
    """Noise schedule and training objective; build it with ``ScheduleConfig(**cfg.diffusion)``.

    ``objective="ddpm"`` is the variance-preserving chain of β, ᾱ, ε/v-prediction and loss
    weighting below. ``"flow_matching"`` is rectified flow, x_σ = (1-σ)·x0 + σ·ε with a velocity
    target and continuous σ: it has no β, so ``beta_*``, ``rescale_zero_terminal_snr`` and
    ``prediction_type`` are ignored (they describe the other chain; the group's defaults for them
    stay valid), and ``num_train_timesteps`` is only the scale of the timestep the model is
    given, σ·T. A non-uniform ``loss_weighting`` is refused there: it would silently do nothing.
    ``noise_offset`` and ``input_perturbation`` apply to both objectives.
    """

    objective: str = "ddpm"
    num_train_timesteps: int = 200
    beta_schedule: str = "linear"
    beta_start: float | None = None
    beta_end: float | None = None
    rescale_zero_terminal_snr: bool = True
    prediction_type: str = "v_prediction"
    loss_weighting: str = "mse"
    min_snr_gamma: float = 5.0
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    flow_shift: float = 1.0
    noise_offset: float = 0.0
    input_perturbation: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 2:
            raise ValueError(
                f"diffusion.num_train_timesteps must be an integer ≥ 2, got "
                f"{self.num_train_timesteps!r}; set it in {_CONFIG_FILE} (the real run uses 200)."
            )
        if not isinstance(self.rescale_zero_terminal_snr, bool):
            raise ValueError(
                "diffusion.rescale_zero_terminal_snr must be true or false, got "
                f"{self.rescale_zero_terminal_snr!r}."
            )
        if not _is_number(self.min_snr_gamma) or self.min_snr_gamma <= 0:
            raise ValueError(
                f"diffusion.min_snr_gamma must be a positive number, got {self.min_snr_gamma!r}; "
                "the min-SNR paper uses 5."
            )
        self._check_training_noise()
        self._check_flow_sigmas()
        if self.objective == "flow_matching":
            self._check_flow_loss_weighting()
            return
        self._check_beta_endpoints()
        if self.rescale_zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "diffusion.rescale_zero_terminal_snr=true makes ᾱ_T exactly 0, where an "
                "ε-prediction carries no information about x0 (x0 = (x_t - √(1-ᾱ)·ε)/√ᾱ "
                "divides by zero). Set diffusion.prediction_type=v_prediction, or turn the "
                "rescaling off."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScheduleConfig:
        return dataclass_from_dict(cls, values, "diffusion")

    @property
    def beta_range(self) -> tuple[float, float]:
        """(β_first, β_last) of a linear or scaled_linear schedule, defaults filled in."""
        if self.beta_schedule not in REFERENCE_BETA_RANGES:
            raise ValueError(
                f"beta_schedule={self.beta_schedule!r} is defined through ᾱ(t) and has no β range."
            )
        reference_start, reference_end = REFERENCE_BETA_RANGES[self.beta_schedule]
        scale = REFERENCE_TIMESTEPS / self.num_train_timesteps
        start = reference_start * scale if self.beta_start is None else float(self.beta_start)
        end = reference_end * scale if self.beta_end is None else float(self.beta_end)
        return start, end

    def _check_training_noise(self) -> None:
        for name in ("noise_offset", "input_perturbation"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(
                    f"diffusion.{name} must be a number ≥ 0, got {value!r}; 0 turns it off "
                    "(diffusers' training scripts suggest about 0.1)."
                )

    def _check_flow_sigmas(self) -> None:
        if not _is_number(self.flow_logit_mean):
            raise ValueError(
                f"diffusion.flow_logit_mean must be a number, got {self.flow_logit_mean!r}."
            )
        for name in ("flow_logit_std", "flow_shift"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(
                    f"diffusion.{name} must be a positive number, got {value!r}; "
                    "SD3 uses flow_logit_std=1.0 and flow_shift=3.0 at 1024 px."
                )

    def _check_flow_loss_weighting(self) -> None:
        if self.loss_weighting != "mse":
            raise ValueError(
                f"diffusion.loss_weighting={self.loss_weighting!r} weighs the timesteps of the "
                "ddpm chain by their SNR; with diffusion.objective=flow_matching the logit-normal "
                "σ sampling (flow_logit_mean, flow_logit_std, flow_shift) decides how much each "
                "noise level counts. Set diffusion.loss_weighting=mse."
            )

    def _check_beta_endpoints(self) -> None:
        given = {
            name: value
            for name, value in (("beta_start", self.beta_start), ("beta_end", self.beta_end))
            if value is not None
        }
        for name, value in given.items():
            if not _is_number(value):
                raise ValueError(
                    f"diffusion.{name} must be a number or null, got {value!r} "
                    f"({type(value).__name__}); write it with a decimal point, e.g. 1.0e-4."
                )
        if self.beta_schedule == "cosine":
            if given:
                raise ValueError(
                    "beta_schedule='cosine' is defined by its ᾱ(t) curve and takes no β "
                    f"endpoints, but got {given}; set them to null or choose beta_schedule=linear."
                )
            return
        start, end = self.beta_range
        if not 0 < start <= end < 1:
            raise ValueError(
                f"diffusion β range must satisfy 0 < beta_start ≤ beta_end < 1, got "
                f"beta_start={start:g}, beta_end={end:g} (T={self.num_train_timesteps}; null "
                f"endpoints default to {REFERENCE_BETA_RANGES[self.beta_schedule]} × 1000/T). "
                "Set both endpoints explicitly or use more timesteps."
            )


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"diffusion.{key}={value!r} is not supported; choose one of {', '.join(choices)}."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

"""Diffusion maths shared by training and sampling: schedule, loss, samplers and guidance.

Pure PyTorch over tensors and a model callable (see ``Denoiser``); nothing here knows a network.
"""

from ldm.diffusion.config import (
    BETA_SCHEDULES,
    LOSS_WEIGHTINGS,
    PREDICTION_TYPES,
    ScheduleConfig,
)
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import guided_prediction
from ldm.diffusion.loop import sample
from ldm.diffusion.objectives import (
    diffusion_loss,
    loss_weights,
    per_sample_loss,
    training_target,
)
from ldm.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    Sampler,
    StepOutput,
    make_sampler,
)
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.timesteps import sampling_timesteps, timesteps_for_strength

__all__ = [
    "BETA_SCHEDULES",
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "Denoiser",
    "NoiseSchedule",
    "Sampler",
    "ScheduleConfig",
    "StepOutput",
    "diffusion_loss",
    "guided_prediction",
    "loss_weights",
    "make_sampler",
    "per_sample_loss",
    "sample",
    "sampling_timesteps",
    "timesteps_for_strength",
    "training_target",
]

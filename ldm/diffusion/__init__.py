"""Diffusion maths shared by training and sampling: schedules (ddpm, flow matching), loss,
samplers and guidance.

Pure PyTorch over tensors and a model callable (see ``Denoiser``); nothing here knows a network.
"""

from ldm.diffusion.config import (
    BETA_SCHEDULES,
    LOSS_WEIGHTINGS,
    OBJECTIVES,
    PREDICTION_TYPES,
    ScheduleConfig,
)
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.flow_matching import FlowMatchingSchedule
from ldm.diffusion.guidance import GuidanceInterval, guided_prediction
from ldm.diffusion.loop import sample
from ldm.diffusion.objectives import (
    Schedule,
    diffusion_loss,
    loss_weights,
    make_schedule,
    per_sample_loss,
    training_noise,
    training_target,
)
from ldm.diffusion.samplers import (
    SAMPLERS,
    SAMPLERS_BY_OBJECTIVE,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    FlowEulerSampler,
    FlowHeunSampler,
    FlowSampler,
    Sampler,
    StepOutput,
    make_sampler,
)
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.timesteps import sampling_timesteps, timesteps_for_strength

__all__ = [
    "BETA_SCHEDULES",
    "LOSS_WEIGHTINGS",
    "OBJECTIVES",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SAMPLERS_BY_OBJECTIVE",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "Denoiser",
    "FlowEulerSampler",
    "FlowHeunSampler",
    "FlowMatchingSchedule",
    "FlowSampler",
    "GuidanceInterval",
    "NoiseSchedule",
    "Sampler",
    "Schedule",
    "ScheduleConfig",
    "StepOutput",
    "diffusion_loss",
    "guided_prediction",
    "loss_weights",
    "make_sampler",
    "make_schedule",
    "per_sample_loss",
    "sample",
    "sampling_timesteps",
    "timesteps_for_strength",
    "training_noise",
    "training_target",
]

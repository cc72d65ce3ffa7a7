"""Which timesteps a sampler visits, and which of them img2img keeps."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import sampling_timesteps, timesteps_for_strength


@pytest.mark.parametrize("steps", [1, 7, 20, 29, 48, 199])
def test_timesteps_descend_from_the_last_training_step_without_repeats(steps):
    timesteps = sampling_timesteps(200, steps)

    assert len(timesteps) == steps
    assert timesteps[0] == 199
    assert (timesteps[1:] < timesteps[:-1]).all()
    assert timesteps[-1] >= 0


def test_as_many_steps_as_training_steps_visits_every_timestep():
    assert torch.equal(sampling_timesteps(200, 200), torch.arange(199, -1, -1))


def test_fewer_steps_are_evenly_strided():
    assert sampling_timesteps(200, 4).tolist() == [199, 149, 99, 49]


def test_full_strength_keeps_every_step():
    timesteps = sampling_timesteps(200, 20)

    assert torch.equal(timesteps_for_strength(timesteps, 1.0), timesteps)


def test_partial_strength_keeps_the_least_noisy_tail():
    timesteps = sampling_timesteps(200, 20)

    kept = timesteps_for_strength(timesteps, 0.3)

    assert torch.equal(kept, timesteps[-6:])


def test_tiny_strength_still_runs_one_step():
    timesteps = sampling_timesteps(200, 20)

    assert timesteps_for_strength(timesteps, 0.01).tolist() == [9]

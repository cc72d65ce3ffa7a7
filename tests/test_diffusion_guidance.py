"""Classifier-free guidance: one batched call, the guidance formula, no extra work at scale 1."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import guided_prediction


class CountingModel:
    """A conditional 'denoiser' whose output depends on cond, recording every call's batch size."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def __call__(self, x_t, t, cond):
        self.batch_sizes.append(x_t.shape[0])
        return (
            0.5 * x_t + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + 0.01 * t.reshape(-1, 1, 1, 1)
        )


def inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(batch, 4, 2, 2, generator=generator)
    t = torch.tensor([10, 20, 30][:batch])
    cond = torch.randn(batch, 5, 8, generator=generator)
    uncond = torch.zeros(batch, 5, 8)
    return x_t, t, cond, uncond


def test_scale_one_is_one_conditional_call_on_batch_b():
    model = CountingModel()
    x_t, t, cond, uncond = inputs()

    out = guided_prediction(model, x_t, t, cond, uncond, cfg_scale=1.0)

    assert model.batch_sizes == [3]
    torch.testing.assert_close(out, CountingModel()(x_t, t, cond))


def test_guidance_is_one_call_on_the_doubled_batch():
    model = CountingModel()
    x_t, t, cond, uncond = inputs()

    guided_prediction(model, x_t, t, cond, uncond, cfg_scale=7.5)

    assert model.batch_sizes == [6]


def test_guidance_extrapolates_from_unconditional_towards_conditional():
    x_t, t, cond, uncond = inputs()
    conditional = CountingModel()(x_t, t, cond)
    unconditional = CountingModel()(x_t, t, uncond)

    out = guided_prediction(CountingModel(), x_t, t, cond, uncond, cfg_scale=4.0)

    torch.testing.assert_close(out, unconditional + 4.0 * (conditional - unconditional))


def test_guidance_without_uncond_is_refused():
    x_t, t, cond, _ = inputs()

    with pytest.raises(ValueError, match=r"cfg_scale=3\.0 needs the unconditional embedding"):
        guided_prediction(CountingModel(), x_t, t, cond, None, cfg_scale=3.0)


def test_uncond_of_another_shape_is_refused_with_both_shapes():
    x_t, t, cond, _ = inputs()

    with pytest.raises(ValueError, match=r"cond \(3, 5, 8\) and uncond \(1, 5, 8\)"):
        guided_prediction(CountingModel(), x_t, t, cond, torch.zeros(1, 5, 8), cfg_scale=3.0)

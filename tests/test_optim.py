"""Learning-rate schedules: linear warmup, then constant or cosine, stepped per batch."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import compose_config

from ldm.config import plain
from ldm.training.optim import build_optimizer


def lrs(optim: dict, total_steps: int) -> list[float]:
    config = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim, total_steps)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


BASE = {
    "lr": 1.0,
    "betas": [0.9, 0.999],
    "weight_decay": 1e-4,
    "lr_warmup_steps": 0,
    "lr_schedule": "constant",
    "min_lr_ratio": 0.0,
}


def test_warmup_ramps_linearly_then_cosine_decays_to_the_floor() -> None:
    rates = lrs({**BASE, "lr_warmup_steps": 10, "lr_schedule": "cosine", "min_lr_ratio": 0.1}, 110)
    assert rates[0] == pytest.approx(1e-3)
    assert rates[5] == pytest.approx(1e-3 + (1 - 1e-3) * 5 / 10)
    assert rates[10] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))


def test_constant_schedule_without_warmup_keeps_the_rate() -> None:
    assert set(lrs(BASE, 20)) == {1.0}


def test_adamw_gets_the_configured_weight_decay() -> None:
    config = build_optimizer([torch.nn.Parameter(torch.zeros(1))], BASE, 10)
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert config["optimizer"].param_groups[0]["weight_decay"] == 1e-4
    assert config["lr_scheduler"]["interval"] == "step"


def test_unknown_schedule_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"constant.*cosine"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], {**BASE, "lr_schedule": "step"}, 5)


@pytest.mark.parametrize(("config_name", "decays"), [("train_vae", False), ("train_unet", True)])
def test_each_stage_gets_the_schedule_its_config_names(config_name: str, decays: bool) -> None:
    """The code reads the YAML's schedule, warmup included: it has no default of its own."""
    optim = plain(compose_config(config_name).optim)
    rates = lrs(optim, optim["lr_warmup_steps"] + 100)
    assert rates[optim["lr_warmup_steps"]] == pytest.approx(optim["lr"])
    assert (rates[-1] < optim["lr"] / 2) is decays

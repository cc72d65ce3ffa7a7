"""AdamW with linear warmup then a constant or cosine learning rate, stepped per batch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

LR_SCHEDULES = ("constant", "cosine")


def _after_warmup(
    optimizer: torch.optim.Optimizer, schedule: str, steps: int, min_lr: float
) -> LRScheduler:
    if schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=max(1, steps), eta_min=min_lr)
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    optim: dict[str, Any],
    total_steps: int,
    *,
    fused: bool = False,
) -> dict[str, Any]:
    """What ``configure_optimizers`` returns, from the ``optim`` config node.

    Warmup starts at 1/1000 of the rate (Adam's early steps are the noisiest); ``total_steps``
    is the run's optimizer step count (Lightning's ``estimated_stepping_batches``). ``fused``
    (the CUDA profile's ``fused_optimizer``) updates every parameter in one kernel per step
    instead of a launch per parameter tensor.
    """
    schedule = optim["lr_schedule"]
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"optim.lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    warmup = optim["lr_warmup_steps"]
    if warmup < 0:
        raise ValueError(f"optim.lr_warmup_steps must be ≥ 0, got {warmup}")
    optimizer = torch.optim.AdamW(
        parameters,
        lr=optim["lr"],
        betas=tuple(optim["betas"]),
        weight_decay=optim["weight_decay"],
        fused=fused or None,
    )
    min_lr = optim["lr"] * optim["min_lr_ratio"]
    warmup = min(warmup, max(0, total_steps - 1))
    main = _after_warmup(optimizer, schedule, total_steps - warmup, min_lr)
    if warmup:
        ramp = LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
        scheduler: LRScheduler = SequentialLR(optimizer, [ramp, main], milestones=[warmup])
    else:
        scheduler = main
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

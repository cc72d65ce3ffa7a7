"""Exponential moving average of the U-Net weights, with a decay that warms up.

Diffusion models sample markedly better from averaged weights. A fixed decay of 0.9999
averages over ~10k steps, so in a short run the average is still mostly the random
initialisation (what the seed run saw). Here the decay starts at 0 and rises with the step
count (the power warmup of k-diffusion's EMAWarmup, also in diffusers' EMAModel):

    decay(step) = min(decay_max, 1 - (1 + step / warmup_inv_gamma) ** -warmup_power)

With the defaults (inv_gamma 1, power 3/4) the average spans roughly the last (1 + step)^0.75
steps: decay 0.9 at step 20, 0.99 at step 460, 0.999 at 10k and 0.9999 from 215k on, so the
average is always a recent one, whatever the run's length.

The EMA is an `nn.Module`: moved with the training module and saved in its checkpoint, step
count included (as extra state).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(nn.Module):
    """Averaged copy of a model, updated by `update(model)` after every optimizer step.

    `update_every=k` averages only on every k-th call, with the decay raised to the k-th power,
    so the averaging horizon in optimizer steps does not depend on k. Buffers are averaged
    along with parameters (`use_buffers=True`), so the copy is self-consistent.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay_max: float = 0.9999,
        warmup_inv_gamma: float = 1.0,
        warmup_power: float = 0.75,
        update_every: int = 1,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay_max < 1.0:
            raise ValueError(
                f"ema.decay_max must be in [0, 1), got {decay_max}; 0.9999 is typical, "
                "0 makes the average a plain copy of the latest weights."
            )
        if warmup_inv_gamma <= 0 or warmup_power <= 0:
            raise ValueError(
                f"ema.warmup_inv_gamma and ema.warmup_power must be positive, got "
                f"{warmup_inv_gamma} and {warmup_power}; 1.0 and 0.75 suit runs up to ~200k steps."
            )
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"ema.update_every must be a positive integer, got {update_every!r}.")
        self.decay_max = decay_max
        self.warmup_inv_gamma = warmup_inv_gamma
        self.warmup_power = warmup_power
        self.update_every = update_every
        self.steps_seen = 0
        # The decay is set before each update (it changes with the step), so none is given here.
        self.averaged = AveragedModel(model, use_buffers=True)
        self.averaged.requires_grad_(False)
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The averaged model, e.g. for sampling or export; always in eval mode."""
        return self.averaged.module

    def decay_at(self, step: int) -> float:
        """Per-optimizer-step decay at 0-based `step`; 0 at step 0, so the first update copies."""
        warmup = 1.0 - (1.0 + step / self.warmup_inv_gamma) ** -self.warmup_power
        return max(0.0, min(self.decay_max, warmup))

    @property
    def decay(self) -> float:
        """Decay of the latest optimizer step (0 before any), for logging."""
        return self.decay_at(max(self.steps_seen - 1, 0))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Record one optimizer step of `model` (the live model the EMA was built from)."""
        self._check_same_architecture(model)
        if self.steps_seen % self.update_every == 0:
            decay = self.decay_at(self.steps_seen) ** self.update_every
            # torch's EMA function takes a fixed decay, so a fresh one is set per update.
            self.averaged.multi_avg_fn = get_ema_multi_avg_fn(decay)
            self.averaged.update_parameters(model)
        self.steps_seen += 1

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into `model` (e.g. for validation) and
        restore its own weights afterwards, even if the body raises.

        Swapping into the live model, rather than using `module`, keeps whatever wraps the
        live model (device placement, DDP, compiled graph) in effect.
        """
        self._check_same_architecture(model)
        live_tensors = _state_tensors(model)
        saved = [tensor.detach().clone() for tensor in live_tensors]
        with torch.no_grad():
            for live, averaged in zip(live_tensors, _state_tensors(self.module), strict=True):
                live.copy_(averaged)
        try:
            yield model
        finally:
            with torch.no_grad():
                for live, original in zip(live_tensors, saved, strict=True):
                    live.copy_(original)

    def train(self, mode: bool = True) -> "EMA":
        """The averaged copy is never trained: it stays in eval mode (dropout off) when the
        training module around it switches to train."""
        super().train(mode)
        self.averaged.eval()
        return self

    def get_extra_state(self) -> dict[str, Any]:
        """Puts the step count into `state_dict()`, so a resumed run continues the warmup."""
        return {"steps_seen": self.steps_seen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps_seen = int(state["steps_seen"])

    def _check_same_architecture(self, model: nn.Module) -> None:
        """AveragedModel pairs tensors by position only; refuse a model that does not match."""
        expected = [(name, t.shape) for name, t in _named_state_tensors(self.module)]
        given = [(name, t.shape) for name, t in _named_state_tensors(model)]
        if expected != given:
            mismatched = sorted(set(expected) ^ set(given))[:3]
            raise ValueError(
                "EMA.update/swapped_in got a model whose parameters and buffers differ from the "
                f"one the EMA was built from (first differences: {mismatched}). Pass the same "
                "(unwrapped) model that was given to EMA(...)."
            )


def _named_state_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters then buffers, in the order AveragedModel(use_buffers=True) pairs them."""
    return [*model.named_parameters(), *model.named_buffers()]


def _state_tensors(model: nn.Module) -> list[Tensor]:
    return [tensor for _, tensor in _named_state_tensors(model)]

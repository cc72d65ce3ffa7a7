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
count included. The update is one fused (foreach) pass over tensor lists built once, with the
decay computed on the device from a step counter there, so it launches a few kernels, reads
nothing back to the host and can live inside a captured CUDA graph.
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class EMA(nn.Module):
    """Averaged copy of a model, updated by `update(model)` after every optimizer step.

    `update_every=k` averages only on every k-th call, with the decay raised to the k-th power,
    so the averaging horizon in optimizer steps does not depend on k. Buffers are averaged
    along with parameters, so the copy is self-consistent.
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
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        # The step count again, on the device: the decay is computed there, never on the host.
        self.register_buffer("device_step", torch.zeros((), dtype=torch.float32))
        self._pairs: tuple[list[Tensor], list[Tensor], nn.Module] | None = None
        self._register_load_state_dict_pre_hook(_rename_averaged_model_keys)

    def decay_at(self, step: int) -> float:
        """Per-optimizer-step decay at 0-based `step`; 0 at step 0, so the first update copies."""
        warmup = 1.0 - (1.0 + step / self.warmup_inv_gamma) ** -self.warmup_power
        return max(0.0, min(self.decay_max, warmup))

    @property
    def decay(self) -> float:
        """Decay of the latest optimizer step (0 before any), for logging; computed on the host."""
        return self.decay_at(max(self.steps_seen - 1, 0))

    def _device_decay(self) -> Tensor:
        """`decay_at(steps_seen) ** update_every`, as a device tensor."""
        warmup = 1.0 - (1.0 + self.device_step / self.warmup_inv_gamma) ** -self.warmup_power
        return warmup.clamp(0.0, self.decay_max) ** self.update_every

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Record one optimizer step of `model` (the live model the EMA was built from)."""
        if self.steps_seen % self.update_every == 0:
            averaged, live = self._tensor_lists(model)
            # averaged ← live + decay·(averaged − live), i.e. a lerp towards live by 1 − decay.
            torch._foreach_sub_(averaged, live)
            torch._foreach_mul_(averaged, self._device_decay())
            torch._foreach_add_(averaged, live)
        self.steps_seen += 1
        self.device_step.add_(1)

    def _tensor_lists(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """The (averaged, live) tensor pairs, built and checked once per model and placement."""
        if self._pairs is None or self._pairs[2] is not model:
            self._check_same_architecture(model)
            self._pairs = (_state_tensors(self.module), _state_tensors(model), model)
        return self._pairs[0], self._pairs[1]

    def _apply(self, fn: Any, recurse: bool = True) -> "EMA":
        """Moving or casting replaces buffers: rebuild the tensor lists at the next update."""
        self._pairs = None
        return super()._apply(fn, recurse)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into `model` (e.g. for validation) and
        restore its own weights afterwards, even if the body raises.

        Swapping into the live model, rather than using `module`, keeps whatever wraps the
        live model (device placement, DDP, compiled graph) in effect.
        """
        averaged, live = self._tensor_lists(model)
        saved = torch._foreach_add(live, 0)  # copies
        with torch.no_grad():
            torch._foreach_copy_(live, averaged)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)

    def train(self, mode: bool = True) -> "EMA":
        """The averaged copy is never trained: it stays in eval mode (dropout off) when the
        training module around it switches to train."""
        super().train(mode)
        self.module.eval()
        return self

    def get_extra_state(self) -> dict[str, Any]:
        """Puts the step count into `state_dict()`, so a resumed run continues the warmup."""
        return {"steps_seen": self.steps_seen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps_seen = int(state["steps_seen"])
        self._pairs = None

    def _check_same_architecture(self, model: nn.Module) -> None:
        """The update pairs tensors by position only; refuse a model that does not match."""
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
    """Parameters then floating-point buffers, in a fixed order."""
    buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    return [*model.named_parameters(), *buffers]


def _state_tensors(model: nn.Module) -> list[Tensor]:
    return [tensor.detach() for _, tensor in _named_state_tensors(model)]


def _rename_averaged_model_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Read checkpoints written before this class stopped wrapping torch's AveragedModel
    (``averaged.module.*`` → ``module.*``; its ``n_averaged`` counter is dropped; the device
    step counter is rebuilt from the step count)."""
    old = f"{prefix}averaged.module."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[f"{prefix}module.{key[len(old) :]}"] = state_dict.pop(key)
    if state_dict.pop(f"{prefix}averaged.n_averaged", None) is not None:
        extra = state_dict.get(f"{prefix}_extra_state", {"steps_seen": 0})
        state_dict.setdefault(f"{prefix}device_step", torch.tensor(float(extra["steps_seen"])))

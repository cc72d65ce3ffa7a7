"""What ldm/diffusion needs from a model: one call, no knowledge of its architecture."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class Denoiser(Protocol):
    """``model(x_t (B, C, H, W), t (B,), cond) -> (B, C, H, W)``.

    ``t`` is a long timestep for the ddpm objective, the float σ·T for flow matching. The output
    is ε or v, as the schedule's ``prediction_type`` says, or the flow velocity ε - x0; ``cond``
    (e.g. text hidden states (B, L, D)) is handed over untouched.
    """

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...

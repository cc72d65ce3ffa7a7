"""What every denoiser takes besides the latents: the timesteps and the text context.

The U-Net and the DiT check them alike at their entrance, so a caller that works with one
works with the other, and a malformed call fails there with a message that says what to pass.
"""

import torch
from torch import Tensor


def checked_conditioning(
    model_name: str,
    x: Tensor,
    t: Tensor | float,
    context: Tensor,
    context_mask: Tensor | None,
    *,
    context_dim: int,
) -> Tensor:
    """Refuse a text context or mask that does not fit latents ``x`` (B, C, h, w); return the
    timesteps as (B,) (one number applies to the whole batch)."""
    batch = x.shape[0]
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != context_dim:
        raise ValueError(
            f"{model_name} expects text context of shape ({batch}, L, {context_dim}), got "
            f"{tuple(context.shape)}. Check the text encoder's width against "
            f"{model_name}Config.context_dim and that context and latents have the same batch."
        )
    if context_mask is not None and (
        context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]
    ):
        raise ValueError(
            f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} "
            f"(True = real token), got {context_mask.dtype} {tuple(context_mask.shape)}."
        )
    if context_mask is not None and not bool(context_mask.any(dim=1).all()):
        raise ValueError(
            "context_mask hides every token of some caption, which leaves cross-attention "
            "nothing to attend to (NaN). Keep at least the start token visible."
        )
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"{model_name} expects timesteps of shape ({batch},) or a single number, got "
            f"{tuple(t.shape)}."
        )
    return t

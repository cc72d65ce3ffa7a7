"""What every denoiser takes besides the latents (the timesteps and the text context), checked
alike, and the pooled caption either can add to its timestep embedding.

The U-Net and the DiT check them alike at their entrance, so a caller that works with one
works with the other, and a malformed call fails there with a message that says what to pass.
"""

import torch
from torch import Tensor, nn

from ldm.models.attention import MultiHeadAttention


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


class TextPooling(nn.Module):
    """The caption as one vector: a learned query attends over its hidden states.

    Added to the time embedding, it reaches every block of the denoiser (the U-Net's residual
    blocks as a per-channel shift, the DiT's adaLN shifts, scales and gates), the way ADM and DiT
    feed class labels and SDXL/SD3 feed pooled text; cross-attention alone makes the network
    learn where to look before it can use a word.
    """

    def __init__(self, context_dim: int, out_dim: int, head_dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, context_dim) * context_dim**-0.5)
        self.norm = nn.LayerNorm(context_dim)
        self.attention = MultiHeadAttention(
            context_dim, context_dim=context_dim, head_dim=head_dim, dropout=0.0
        )
        self.proj = nn.Linear(context_dim, out_dim)

    def forward(self, context: Tensor, context_mask: Tensor | None) -> Tensor:
        query = self.query.expand(context.shape[0], -1, -1)  # (B, 1, context_dim)
        pooled = self.attention(query, self.norm(context), context_mask)  # (B, 1, context_dim)
        return self.proj(pooled[:, 0])  # (B, out_dim)

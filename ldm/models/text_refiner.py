"""Trainable transformer layers between the frozen caption states and the denoiser.

The frozen text encoder is causal (CLIP): a word's state knows only the words before it, so in
"blue backdrop with a red circle" nothing at "blue" says it names the background, and a small
denoiser must learn to find that out through cross-attention alone. A few bidirectional layers,
trained with the denoiser, let every token see the whole caption first and bind each colour to
the noun it describes. Hunyuan-DiT/HunyuanVideo's token refiner and Lumina's context refiner do
the same on top of their frozen encoders. The cached states stay as they are; the refiner runs
on each batch, at the denoiser's own attention width (a linear map down from the encoder's,
which also makes every cross-attention's key and value projections smaller), and each residual
branch starts at zero.
"""

from torch import Tensor, nn

from ldm.models.attention import GEGLUFeedForward, MultiHeadAttention


def check_text_refiner(owner: str, layers: int) -> None:
    """Refuse a refiner depth that cannot be built, naming the config key."""
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        raise ValueError(
            f"{owner}.text_refiner_layers must be a non-negative integer (0 = off), got {layers!r}."
        )


class TextRefinerLayer(nn.Module):
    """Pre-LayerNorm residual block: self-attention over the caption's tokens, then an MLP."""

    def __init__(self, dim: int, *, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(
            dim, context_dim=None, head_dim=head_dim, dropout=dropout
        )
        self.norm_ff = nn.LayerNorm(dim)
        self.feed_forward = GEGLUFeedForward(dim, dropout=dropout)
        for projection in (self.attention.to_out[0], self.feed_forward.proj_out):
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        h = self.norm_attention(tokens)
        # Padding never serves as a key; padded positions still get (unused) outputs.
        tokens = tokens + self.attention(h, h, mask)
        return tokens + self.feed_forward(self.norm_ff(tokens))  # (B, L, dim)


class TextRefiner(nn.Module):
    """(context (B, L, context_dim), mask (B, L) True = real token) -> (B, L, out_dim).

    With no layers it passes the context through as it is (out_dim = context_dim): denoisers
    built before the refiner existed load unchanged.
    """

    def __init__(
        self, context_dim: int, *, width: int, layers: int, head_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.out_dim = width if layers else context_dim
        self.proj_in = nn.Linear(context_dim, width) if layers else nn.Identity()
        self.layers = nn.ModuleList(
            TextRefinerLayer(width, head_dim=head_dim, dropout=dropout) for _ in range(layers)
        )

    def forward(self, context: Tensor, mask: Tensor | None) -> Tensor:
        context = self.proj_in(context)
        for layer in self.layers:
            context = layer(context, mask)
        return context

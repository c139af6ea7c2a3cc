"""Self-attention over the annotation vectors, so each region can see the others before decoding.

The CNN's cells only see their receptive field; a few Transformer encoder layers over the
L = H' * W' annotation vectors let every region gather context from the whole image
(design notes §1, self-attention and multi-head attention). Off by default (layers=0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from caption.errors import CaptionError


class SelfAttentionConfigError(CaptionError, ValueError):
    """A bad self-attention setting; a ValueError for plain callers."""


def positional_encoding_2d(
    H: int, W: int, dim: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Fixed sinusoidal 2-D encodings (H * W, dim), row-major like the encoder's flatten.

    Channels [0, dim/2) encode the row and [dim/2, dim) the column, each the 1-D encoding of
    Vaswani et al.: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)),
    with d = dim/2. Its first pair (sin p, cos p) alone already tells integer positions apart.
    """
    if dim <= 0 or dim % 4:
        raise SelfAttentionConfigError(
            f"2-D positional encodings need the annotation size D divisible by 4 "
            f"(half for rows, half for columns, each sin/cos pairs), got D={dim}"
        )
    d = dim // 2
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))

    def encode(n: int) -> Tensor:  # (n, d) 1-D encoding, computed in float64 then cast
        angle = torch.arange(n, dtype=torch.float64).unsqueeze(1) * freq  # (n, d/2)
        return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # interleave sin/cos

    rows = encode(H).unsqueeze(1).expand(H, W, d)  # every cell of row r shares the row half
    cols = encode(W).unsqueeze(0).expand(H, W, d)  # every cell of column c shares the col half
    pe = torch.cat([rows, cols], dim=-1).reshape(H * W, dim)  # index r * W + c
    return pe.to(device=device, dtype=dtype or torch.get_default_dtype())


class AnnotationSelfAttention(nn.Module):
    """(B, L, D) -> (B, L, D): 2-D positions, `layers` pre-norm Transformer layers, LayerNorm.

    The positional encoding is scaled by a learned scalar (init 1): backbones differ widely in
    feature scale (BN-ReLU small_cnn cells vs. ResNet's large sparse ones), and a fixed ±1 code
    could drown the features or vanish next to them. Without the encoding the layers are
    permutation-equivariant and could not tell where a region is. With layers=0 the module is
    the identity and has no parameters, so old checkpoints and configs are unchanged.
    A constant shift of one whole annotation vector (its channel mean) never reaches the output:
    each block reads its input through a LayerNorm and the final LayerNorm removes what the
    residual stream carried, so one direction of D is given up.

    Args:
        dim: D, the annotation vector size.
        layers: Transformer encoder layers; 0 turns self-attention off.
        heads: attention heads; must divide D.
        ff_dim: hidden size of each layer's feed-forward block.
        dropout: dropout inside each layer (attention weights, feed-forward, residuals).
    """

    def __init__(
        self, dim: int, layers: int = 0, heads: int = 4, ff_dim: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if layers < 0:
            raise SelfAttentionConfigError(f"layers must be >= 0 (0 = off), got {layers}")
        self.dim, self.layers = dim, int(layers)
        if self.layers == 0:
            return  # off: the head/width settings are unused, so they are not checked either
        if heads < 1 or dim % heads:
            raise SelfAttentionConfigError(
                f"heads must be a positive divisor of the annotation size D={dim}, got {heads}"
            )
        if ff_dim < 1:
            raise SelfAttentionConfigError(f"ff_dim must be >= 1, got {ff_dim}")
        if not 0 <= dropout < 1:
            raise SelfAttentionConfigError(f"dropout must be in [0, 1), got {dropout}")
        positional_encoding_2d(1, 1, dim)  # fail on D % 4 at build time, not at the first batch
        self.pos_scale = nn.Parameter(torch.ones(()))
        # PyTorch's own layer rather than a hand-written block: it is tested, dispatches to the
        # fused SDPA kernels, and norm_first=True gives the pre-norm residual stream that trains
        # stably without warm-up. A ModuleList (not nn.TransformerEncoder) because that wrapper
        # warns about nested tensors with norm_first and would add a mask API we do not need.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, ff_dim, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(self.layers)
        )
        self.ln_f = nn.LayerNorm(dim)  # a pre-norm stream is never normalised at its end

    def forward(self, annotations: Tensor, grid: tuple[int, int]) -> Tensor:
        """Contextualise annotations a (B, L, D) laid out row-major on the (H', W') `grid`."""
        B, L, D = annotations.shape  # L = H*W annotation vectors
        H, W = grid
        if H * W != L or self.dim != D:
            # a caller bug, not a config value: a plain ValueError keeps the traceback
            raise ValueError(
                f"annotations {tuple(annotations.shape)} do not fit a {H}x{W} grid "
                f"of D={self.dim} vectors"
            )
        if self.layers == 0:
            return annotations
        pe = positional_encoding_2d(H, W, D, annotations.device, annotations.dtype)
        x = annotations + self.pos_scale * pe  # (B, L, D) + (L, D)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

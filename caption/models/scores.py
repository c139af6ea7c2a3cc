"""Score functions f_att: how well a query h (B, H) matches each annotation vector a_i.

A score module has two methods, so that the step-independent work runs once per image:
`keys(annotations (B, L, D)) -> keys (B, L, *)` and `forward(query (B, H), keys) -> e (B, L)`.
It is built with `query_dim=H` and `key_dim=D` by the weighting that owns it.
Pick one with `model/score=additive|dot|scaled_dot|general`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

# In place: the (B, L, A) sum they act on is a fresh temporary and the largest tensor of a
# decoder step, so not allocating a second one saves memory traffic (autograd allows it: the
# sum's backward does not need its output).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"tanh": torch.tanh_, "relu": torch.relu_}


class AdditiveScore(nn.Module):
    """Additive (MLP) score of Bahdanau et al. and Xu et al.: e_i = v_aᵀ act(W_a a_i + U_a h).

    Args:
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size.
        hidden_dim: the MLP's hidden size.
        activation: `tanh` (the paper) or `relu`.
    """

    def __init__(
        self, query_dim: int, key_dim: int, hidden_dim: int = 256, activation: str = "tanh"
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.score.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        self.key_proj = nn.Linear(key_dim, hidden_dim)  # W_a
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=False)  # U_a
        self.act = ACTIVATIONS[activation]
        self.v = nn.Linear(hidden_dim, 1)  # v_a

    def keys(self, annotations: Tensor) -> Tensor:
        """W_a a_i for all i, once per image: it does not depend on the step."""
        return self.key_proj(annotations)  # (B, L, D) -> (B, L, A)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """Scores e (B, L) of query h (B, H) against precomputed keys (B, L, A)."""
        q = self.query_proj(query)  # (B, H) -> (B, A)
        hidden = self.act(keys + q.unsqueeze(1))  # (B, L, A)
        return self.v(hidden).squeeze(-1)  # (B, L, A) -> (B, L)


class DotScore(nn.Module):
    """Multiplicative (dot-product) score, Luong et al.'s "dot": e_i = qᵀ a_i.

    The dot product needs the query in the annotation space. When `query_dim == key_dim`
    the query is the decoder state itself, q = h, and the score has no parameters at all.
    When they differ (the default model has H = 256 and D = 64) the query is projected,
    q = W_q h, with a bias-free W_q of shape (D, H): that projection is the only learned
    part, and exists only because the LSTM state and the annotation vectors differ in size.

    Args:
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size.
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        # None rather than nn.Identity, so that H == D leaves nothing in the state dict.
        self.query_proj = (
            nn.Linear(query_dim, key_dim, bias=False) if query_dim != key_dim else None
        )  # W_q

    def keys(self, annotations: Tensor) -> Tensor:
        """The annotations themselves: the dot score has no per-image work to precompute."""
        return annotations  # (B, L, D)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """Scores e (B, L) of query h (B, H) against the annotations (B, L, D)."""
        q = query if self.query_proj is None else self.query_proj(query)  # (B, H) -> (B, D)
        # One batched matmul instead of broadcast-multiply-sum: no (B, L, D) temporary.
        return torch.bmm(keys, q.unsqueeze(-1)).squeeze(-1)  # (B, L, D) @ (B, D, 1) -> (B, L)


class ScaledDotScore(DotScore):
    """Scaled dot-product score of Vaswani et al.: e_i = qᵀ a_i / √d, with d = D = `key_dim`.

    The query q is built exactly as in `DotScore` (q = h, or q = W_q h when H ≠ D), and the
    parameters are the same, so a `DotScore` state dict loads into it unchanged. Dividing by
    √d keeps the variance of the dot product from growing with d, which would otherwise push
    the softmax into saturation, where its gradients vanish.

    Args:
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size, the d of √d.
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__(query_dim, key_dim)
        self.scale = math.sqrt(key_dim)  # a float, not a buffer: state dicts stay DotScore's

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """Scores e (B, L): `DotScore`'s scores divided by √d."""
        # Divide the (B, L) scores, not the keys: cheap, and exactly dot / √d.
        return super().forward(query, keys) / self.scale  # (B, L) -> (B, L)


class GeneralScore(nn.Module):
    """Bilinear score, Luong et al.'s "general": e_i = hᵀ W a_i, W a learned (H × D) matrix.

    Unlike `DotScore` it has a full interaction matrix even when H == D. W a_i does not depend
    on the step, so `keys` computes it once per image and each step is a single matmul.

    Args:
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size.
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        # Its weight, of shape (H, D), is W; no bias: a term bᵀh is constant over i and
        # cancels in the softmax.
        self.key_proj = nn.Linear(key_dim, query_dim, bias=False)  # W

    def keys(self, annotations: Tensor) -> Tensor:
        """W a_i for all i, once per image: it does not depend on the step."""
        return self.key_proj(annotations)  # (B, L, D) -> (B, L, H)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """Scores e (B, L) of query h (B, H) against precomputed keys W a_i (B, L, H)."""
        return torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)  # (B, L, H) @ (B, H, 1) -> (B, L)

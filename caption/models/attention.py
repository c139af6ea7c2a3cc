"""Attention over annotation vectors: a score function f_att and a weighting φ.

Every attention takes a query h (B, H) and annotations a (B, L, D) and returns weights
α (B, L) and a context ẑ (B, D). Scores and weightings are separate modules, so that each
variant is a Hydra config-group swap (`model/score=...`, `model/attention=...`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


class AttentionOutput(NamedTuple):
    context: Tensor  # (B, D) ẑ_t, before the β gate
    alpha: Tensor  # (B, L) attention weights, non-negative, summing to 1


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
        self.act = ACTIVATIONS[activation]()
        self.v = nn.Linear(hidden_dim, 1)  # v_a

    def keys(self, annotations: Tensor) -> Tensor:
        """W_a a_i for all i, once per image: it does not depend on the step."""
        return self.key_proj(annotations)  # (B, L, D) -> (B, L, A)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """Scores e (B, L) of query h (B, H) against precomputed keys (B, L, A)."""
        q = self.query_proj(query)  # (B, H) -> (B, A)
        return self.v(self.act(keys + q.unsqueeze(1))).squeeze(-1)  # (B, L, A) -> (B, L)


class SoftAttention(nn.Module):
    """Deterministic soft attention: ẑ = Σ_i α_i a_i, the expectation of the context.

    It is smooth, so plain backpropagation trains it (Xu et al. §4.2).

    Args:
        score: builds the score function given `query_dim` and `key_dim`.
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size.
    """

    def __init__(self, score: Callable[..., nn.Module], query_dim: int, key_dim: int) -> None:
        super().__init__()
        self.score = score(query_dim=query_dim, key_dim=key_dim)

    def keys(self, annotations: Tensor) -> Tensor:
        """The step-independent part of the score, computed once per image."""
        return self.score.keys(annotations)

    def forward(self, query: Tensor, annotations: Tensor, keys: Tensor) -> AttentionOutput:
        """Attend with query h (B, H) over annotations a (B, L, D)."""
        alpha = self.score(query, keys).softmax(dim=-1)  # (B, L)
        context = torch.bmm(alpha.unsqueeze(1), annotations).squeeze(1)  # (B, 1, L) @ (B, L, D)
        return AttentionOutput(context, alpha)

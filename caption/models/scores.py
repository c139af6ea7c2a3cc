"""Score functions f_att: how well a query h (B, H) matches each annotation vector a_i.

A score module has two methods, so that the step-independent work runs once per image:
`keys(annotations (B, L, D)) -> keys (B, L, *)` and `forward(query (B, H), keys) -> e (B, L)`.
It is built with `query_dim=H` and `key_dim=D` by the weighting that owns it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


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

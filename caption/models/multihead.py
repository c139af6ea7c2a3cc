"""Multi-head attention for the decoder: h weightings over projected annotation vectors."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from caption.models.attention import AttentionOutput, CaptionSteps


class MultiHeadMemory(NamedTuple):
    values: list[Tensor]  # per head, the projected annotations (B, L, D/h)
    memories: list[object]  # per head, what its weighting's `prepare` returned


class MultiHeadAttention(nn.Module):
    """h attention heads over projected queries, keys and values, concatenated and projected.

    Head j attends over W_v^j a (B, L, D/h), which serves as its keys and values; its own score
    function projects the query h_{t-1}. The h contexts are concatenated and projected by W_o.
    α is reported as the mean over heads, so that the penalty and the visualizer see one map;
    a windowed head's p_t is reported per head, (B, h, 2), since each head has its own window.
    With h = 1 the decoder uses the plain single-head attention instead of this module.

    Args:
        attention: builds one head's weighting given `score`, `query_dim` and `key_dim`.
        score: builds one head's score function.
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size; must be divisible by `heads`.
        heads: h.
    """

    def __init__(
        self,
        attention: Callable[..., nn.Module],
        score: Callable[..., nn.Module],
        query_dim: int,
        key_dim: int,
        heads: int,
    ) -> None:
        super().__init__()
        if heads < 2 or key_dim % heads:
            raise ValueError(
                f"heads must be >= 2 and divide the annotation size D = {key_dim}, got {heads}"
            )
        self.heads = heads
        self.head_dim = key_dim // heads
        self.values = nn.Linear(key_dim, key_dim, bias=False)  # W_v of all heads at once
        self.attend = nn.ModuleList(
            attention(score=score, query_dim=query_dim, key_dim=self.head_dim) for _ in range(heads)
        )
        self.out = nn.Linear(key_dim, key_dim, bias=False)  # W_o
        # What the heads declare, the whole declares: every head is built alike.
        self.stochastic: bool = any(head.stochastic for head in self.attend)
        self.window: int | None = self.attend[0].window
        self.samples: int = 1
        if self.stochastic:
            raise ValueError(
                "heads > 1 works with soft and local attention; hard attention samples "
                "one location per word, so set heads to 1"
            )

    def prepare(self, annotations: Tensor) -> MultiHeadMemory:
        """Project the annotations once per image and prepare every head."""
        values = self.values(annotations).split(self.head_dim, dim=-1)  # h x (B, L, D/h)
        return MultiHeadMemory(
            list(values), [h.prepare(v) for h, v in zip(self.attend, values, strict=True)]
        )

    def select(self, memory: MultiHeadMemory, index: slice | Tensor) -> MultiHeadMemory:
        """The memory of the sequences `index` picks, for every head."""
        return MultiHeadMemory(
            [v[index] for v in memory.values],
            [h.select(m, index) for h, m in zip(self.attend, memory.memories, strict=True)],
        )

    def forward(
        self,
        query: Tensor,
        annotations: Tensor,
        memory: MultiHeadMemory,
        location: Tensor | None = None,
    ) -> AttentionOutput:
        """Attend with every head and combine; `annotations` are reached through `memory`."""
        outs = [
            head(query, v, m, location)
            for head, v, m in zip(self.attend, memory.values, memory.memories, strict=True)
        ]
        context = self.out(torch.cat([o.context for o in outs], dim=-1))  # (B, h*D/h) -> (B, D)
        alpha = torch.stack([o.alpha for o in outs]).mean(dim=0)  # (B, L) mean over heads
        position = None
        if outs[0].position is not None:  # (B, h, 2) each head's window centre
            position = torch.stack([o.position for o in outs], dim=1)
        return AttentionOutput(context, alpha, alpha.argmax(dim=-1), position=position)

    def surrogate(
        self, steps: CaptionSteps, reward: Tensor | None = None, baseline: Tensor | None = None
    ) -> Tensor | None:
        """The heads' training terms per caption (B,), summed; None when no head has one.

        The heads are deterministic (a stochastic one is refused), so this is None today; it
        delegates so that the whole stays what its heads are.
        """
        terms = [
            term
            for head in self.attend
            if (term := head.surrogate(steps, reward, baseline)) is not None
        ]
        return torch.stack(terms).sum(dim=0) if terms else None

"""Local attention over a square grid of image regions.

Luong et al. (2015) attend softly inside a window [p_t − D, p_t + D] of a 1-D source sentence,
around an aligned position p_t that is either predicted from the decoder state or set to t.
No captioning paper is known to have moved this to images; here p_t is a 2-D point on the
S×S grid of annotation vectors and the window is a square. The nearest prior art is DRAW's
Gaussian filterbank (Gregor et al. 2015), which also reads an image through a learned,
differentiable Gaussian centred on a predicted point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from caption.models.attention import AttentionOutput, SoftAttention, expectation


@dataclass
class LocalMemory:
    """Per-sequence memory: `prepare` makes a fresh one, every `forward` reads and advances it."""

    keys: Tensor  # (B, L, A) the score's precomputed keys
    side: int  # S: the grid is S×S, L = S*S
    centres: Tensor  # (L, 2) (i + 0.5, j + 0.5) of each cell, in row-major order
    step: int = 0  # t, the forward calls so far: monotonic alignment looks at cell t mod L


class LocalAttention(SoftAttention):
    """Soft attention inside a square window of cells around an aligned point p_t.

    Coordinates are cell-centre ones: cell (i, j) (row i, column j, row-major index i*S + j)
    has centre c = (i + 0.5, j + 0.5), so p_t = (p_y, p_x) lies in [0, S]². The window is the
    square of cells with |c_y − p_y| ≤ D and |c_x − p_x| ≤ D. It is never empty: the cell
    containing p_t has its centre within 0.5 of p_t on each axis, and D ≥ 1. Inside it,

        α_i ∝ softmax_window(e)_i · exp(−‖c_i − p_t‖² / (2σ²)),  renormalised to sum to 1,

    and α_i = 0 outside. That product renormalised equals a softmax of e_i − ‖c_i − p_t‖²/(2σ²)
    over the window, which is how it is computed: a narrow Gaussian cannot underflow to 0/0.
    Gradients reach p_t (and so W_p, v) through the Gaussian; the window cut-off is a hard,
    non-differentiable choice, as in Luong et al.

    Alignments:
        predictive: p_t = S · σ(v_pᵀ tanh(W_p h_{t-1})), with v_p = (v_y, v_x).
        monotonic: p_t = the centre of cell t mod L in raster (row-major) scan order. Images
            have no natural reading order, so this is a baseline only; it has no parameters.

    `location` in the output is the cell containing p_t and `position` is p_t (B, 2), detached;
    with `window` that is enough for a visualizer to outline the window. `last_position`
    keeps the last step's p_t as well.

    Args:
        score: builds the score function given `query_dim` and `key_dim`.
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size.
        window: D, the window radius in cells (>= 1).
        sigma: σ of the Gaussian in cells; None means D/2 (Luong et al.'s choice).
        alignment: `predictive` or `monotonic`.
        hidden_dim: the size of W_p's output, for predictive alignment.
    """

    ALIGNMENTS = ("predictive", "monotonic")

    def __init__(
        self,
        score: Callable[..., nn.Module],
        query_dim: int,
        key_dim: int,
        window: int = 2,
        sigma: float | None = None,
        alignment: str = "predictive",
        hidden_dim: int = 128,
    ) -> None:
        super().__init__(score, query_dim, key_dim)

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        sigma_ok = sigma is None or (isinstance(sigma, int | float) and sigma > 0)
        checks = [
            (is_int(window) and window >= 1, "window", window, "an integer >= 1"),
            (sigma_ok, "sigma", sigma, "a number > 0, or null for window / 2"),
            (alignment in self.ALIGNMENTS, "alignment", alignment, f"one of {self.ALIGNMENTS}"),
            (is_int(hidden_dim) and hidden_dim >= 1, "hidden_dim", hidden_dim, "an integer >= 1"),
        ]
        for ok, key, value, expected in checks:
            if not ok:
                raise ValueError(f"{key} must be {expected}, got {value!r}")
        self.window = window
        self.sigma = float(sigma) if sigma is not None else window / 2
        self.alignment = alignment
        # Monotonic alignment predicts nothing: no W_p, so no parameter goes without gradient.
        predictive = alignment == "predictive"
        self.W_p = nn.Linear(query_dim, hidden_dim) if predictive else None
        self.v_p = nn.Linear(hidden_dim, 2) if predictive else None  # rows v_y, v_x
        self.last_position: Tensor | None = None  # (B, 2) p_t of the last step, for visualizing

    def prepare(self, annotations: Tensor) -> LocalMemory:
        """The score's keys, the grid side and cell centres, and a step counter at 0."""
        B, L, D = annotations.shape  # L = S*S cells
        S = math.isqrt(L)
        if S * S != L:
            raise ValueError(
                f"local attention needs a square grid of regions, but got L = {L} annotation "
                "vectors, which is not a perfect square (resize images to squares)"
            )
        ij = torch.arange(S, device=annotations.device, dtype=annotations.dtype) + 0.5
        centres = torch.cartesian_prod(ij, ij)  # (L, 2) row-major: (i + 0.5, j + 0.5)
        return LocalMemory(self.score.keys(annotations), S, centres)

    def select(self, memory: LocalMemory, index: slice | Tensor) -> LocalMemory:
        """The memory of the sequences `index` picks; it carries on from `memory`'s step.

        Use the returned memory from here on: `forward` advances the step of the one it gets.
        """
        return replace(memory, keys=memory.keys[index])

    def forward(
        self,
        query: Tensor,
        annotations: Tensor,
        memory: LocalMemory,
        location: Tensor | None = None,
    ) -> AttentionOutput:
        """Attend with query h (B, H) inside the window around p_t; advances `memory.step`.

        Args:
            query: h_{t-1}, (B, H).
            annotations: a, (B, L, D).
            memory: what `prepare` returned for this sequence; its `step` is advanced by one.
            location: local attention chooses its own window, so this must be None.
        """
        if location is not None:
            raise ValueError("local attention has no location to force")
        B, L = len(query), annotations.shape[1]  # B query rows (K per image); L = S*S cells
        S = memory.side
        if self.W_p is not None:
            p = S * torch.sigmoid(self.v_p(torch.tanh(self.W_p(query))))  # (B, 2) in [0, S]²
        else:
            p = memory.centres[memory.step % L].expand(B, 2)  # raster scan, wrapping after L
        memory.step += 1
        offset = memory.centres - p.unsqueeze(1)  # (B, L, 2) c_i − p_t
        # The cell containing p_t (p = S lies on the far edge: clamp it into the last cell).
        cell = p.detach().floor().long().clamp(0, S - 1)  # (B, 2)
        here = cell[:, 0] * S + cell[:, 1]  # (B,) row-major index
        inside = (offset.detach().abs() <= self.window).all(dim=-1)  # (B, L) the square window
        log_gauss = -offset.pow(2).sum(dim=-1) / (2 * self.sigma**2)  # (B, L)
        logits = self.score(query, memory.keys) + log_gauss
        alpha = logits.masked_fill(~inside, float("-inf")).softmax(dim=-1)  # 0 outside exactly
        context = expectation(alpha, annotations)  # (B, D)
        self.last_position = p.detach()
        return AttentionOutput(context, alpha, here, position=self.last_position)

"""Score functions f_att: how well a query h (B, H) matches each annotation vector a_i.

A score module has two methods, so that the step-independent work runs once per image:
`keys(annotations (B, L, D)) -> keys (B, L, *)` and `forward(query (B·K, H), keys) -> e (B·K, L)`.
The query may hold K consecutive rows per image (beam search's K hypotheses), which all score
against their image's keys: the keys are computed, stored and read once per image, not K times.
It is built with `query_dim=H` and `key_dim=D` by the weighting that owns it.
Pick one with `model/score=additive|dot|scaled_dot|general`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# The additive score works through its (B, K, L, A) hidden units this many at a time (4 MiB
# of float32), so that the sum, the activation and the weighted sum over A (and in training
# their gradients) stay in cache instead of each making a trip through memory. Each query's
# scores are computed the same way whatever the chunk, so a batch's scores equal those of its
# rows scored one at a time.
CHUNK_ELEMENTS = 2**20


class AdditiveScore(nn.Module):
    """Additive (MLP) score of Bahdanau et al. and Xu et al.: e_i = v_aᵀ act(W_a a_i + U_a h).

    With `tanh` it computes the same function through tanh(x) = 2σ(2x) − 1, folded into the
    weights: e_i = (2 v_a)ᵀ σ(2 W_a a_i + 2 U_a h) + (b_v − Σ v_a). PyTorch's CPU sigmoid is
    about six times faster than its tanh, and the (B, L, A) activation is the bulk of a decoder
    step's elementwise work. The parameters, and so the checkpoints, are those of the tanh form.

    Args:
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size.
        hidden_dim: the MLP's hidden size.
        activation: `tanh` (the paper) or `relu`.
    """

    ACTIVATIONS = ("tanh", "relu")

    def __init__(
        self, query_dim: int, key_dim: int, hidden_dim: int = 256, activation: str = "tanh"
    ) -> None:
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {list(self.ACTIVATIONS)}, got {activation!r}"
            )
        self.key_proj = nn.Linear(key_dim, hidden_dim)  # W_a
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=False)  # U_a
        self.v = nn.Linear(hidden_dim, 1)  # v_a
        self.activation = activation
        # Doubling is exact in floating point, so 2x below is exactly twice the tanh's input.
        self.scale = 2.0 if activation == "tanh" else 1.0

    def keys(self, annotations: Tensor) -> Tensor:
        """W_a a_i for all i, once per image: it does not depend on the step.

        Under `tanh` these are 2 (W_a a_i + b_a), the sigmoid form's input.
        """
        s = self.scale
        return F.linear(annotations, s * self.key_proj.weight, s * self.key_proj.bias)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """Scores e (B·K, L) of queries h (B·K, H) against precomputed keys (B, L, A)."""
        B, L, A = keys.shape
        q = F.linear(query, self.scale * self.query_proj.weight)  # (B·K, H) -> (B·K, A)
        q = q.view(B, -1, 1, A)  # (B, K, 1, A): the K queries of each image
        if self.activation == "tanh":
            act, v = torch.sigmoid_, 2 * self.v.weight[0]  # (A,)
            bias = self.v.bias - self.v.weight.sum()  # the −1 of 2σ(2x) − 1, through v_a
        else:
            act, v, bias = torch.relu_, self.v.weight[0], self.v.bias
        K = q.shape[1]
        if torch.is_grad_enabled():
            if self.activation == "tanh":
                e = _SigmoidLayer.apply(keys, q, v)  # (B, K, L, 1)
            else:
                # In place: the sum is a fresh temporary, and relu's backward needs its output.
                hidden = act(keys.unsqueeze(1) + q)  # (B, K, L, A)
                e = torch.matmul(hidden, v.unsqueeze(-1))  # (B, K, L, A) @ (A, 1)
            return (e + bias).view(B * K, L)
        e = keys.new_empty(B, K, L)
        for i, j in _chunks(B, K * L * A):
            hidden = act(keys[i:j].unsqueeze(1) + q[i:j])  # (b, K, L, A)
            torch.sum(hidden.mul_(v), dim=-1, out=e[i:j])  # v_aᵀ act(..), in cache
        return e.add_(bias).view(B * K, L)


class _SigmoidLayer(torch.autograd.Function):
    """e = σ(k + q) w for keys k (B, L, A), queries q (B, K, 1, A) and w (A,): (B, K, L, 1).

    The (B, K, L, A) hidden units are the largest tensors of a training step. Autograd would
    make five trips through memory over them forward (add, σ, the dot with w) and backward (the
    outer product g wᵀ, σ', the sums); here both directions work through them in cache-sized
    chunks of images, so that each unit goes through memory twice: written forward, read back.
    """

    @staticmethod
    def forward(ctx: Any, keys: Tensor, q: Tensor, w: Tensor) -> Tensor:
        B, L, A = keys.shape
        K = q.shape[1]
        ctx.dtypes = keys.dtype, q.dtype, w.dtype
        dtype = torch.promote_types(keys.dtype, q.dtype)  # under autocast, both low precision
        w = w.to(dtype)
        hidden = keys.new_empty(B, K, L, A, dtype=dtype)
        e = keys.new_empty(B, K, L, 1, dtype=dtype)
        for i, j in _chunks(B, K * L * A):
            h = torch.add(keys[i:j].unsqueeze(1), q[i:j], out=hidden[i:j]).sigmoid_()
            torch.mm(h.view(-1, A), w.view(A, 1), out=e[i:j].view(-1, 1))  # (n, A) @ (A, 1)
        ctx.save_for_backward(hidden, w)
        return e

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden, w = ctx.saved_tensors
        B, K, L, A = hidden.shape
        grad = grad.to(hidden.dtype).contiguous()  # (B, K, L, 1)
        grad_keys = hidden.new_empty(B, L, A)
        grad_q = hidden.new_empty(B, K, 1, A)
        grad_w = hidden.new_zeros(1, A)
        for i, j in _chunks(B, K * L * A):
            h, g = hidden[i:j], grad[i:j]
            grad_w.addmm_(g.view(1, -1), h.view(-1, A))  # Σ g σ: (1, n) @ (n, A)
            # One query per image (training): the keys' gradient is written where it belongs.
            pre = grad_keys[i:j].unsqueeze(1) if K == 1 else None
            pre = torch.addcmul(h, h, h, value=-1.0, out=pre).mul_(w).mul_(g)  # g w σ(1 − σ)
            if K > 1:
                torch.sum(pre, dim=1, out=grad_keys[i:j])  # (b, L, A): over the K queries
            torch.sum(pre, dim=2, keepdim=True, out=grad_q[i:j])  # (b, K, 1, A): over L
        dtype_keys, dtype_q, dtype_w = ctx.dtypes
        return grad_keys.to(dtype_keys), grad_q.to(dtype_q), grad_w.view(A).to(dtype_w)


def _chunks(B: int, per_image: int) -> Iterator[tuple[int, int]]:
    """[i, j) ranges of images whose `per_image` elements each fill about CHUNK_ELEMENTS."""
    rows = max(1, CHUNK_ELEMENTS // per_image)
    return ((i, min(i + rows, B)) for i in range(0, B, rows))


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
        """Scores e (B·K, L) of queries h (B·K, H) against the annotations (B, L, D)."""
        q = query if self.query_proj is None else self.query_proj(query)  # (B·K, H) -> (B·K, D)
        return _grouped_bmm(keys, q)


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
        """Scores e (B·K, L): `DotScore`'s scores divided by √d."""
        # Divide the (B·K, L) scores, not the keys: cheap, and exactly dot / √d.
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
        """Scores e (B·K, L) of queries h (B·K, H) against precomputed keys W a_i (B, L, H)."""
        return _grouped_bmm(keys, query)


def _grouped_bmm(keys: Tensor, q: Tensor) -> Tensor:
    """e (B·K, L) = keys (B, L, d) · q (B·K, d), each image's K queries against its own keys.

    One batched matmul instead of broadcast-multiply-sum: no (B, K, L, d) temporary.
    """
    B, L, d = keys.shape
    e = torch.bmm(keys, q.view(B, -1, d).transpose(1, 2))  # (B, L, d) @ (B, d, K) -> (B, L, K)
    return e.transpose(1, 2).reshape(-1, L)  # (B·K, L)

"""Self-attention over annotation vectors: 2-D positional encodings and the encoder layers."""

from __future__ import annotations

import re

import pytest
import torch

from caption.errors import CaptionError
from caption.models.self_attention import AnnotationSelfAttention, positional_encoding_2d

B, H, W, D = 2, 3, 4, 16
L = H * W


def make(layers: int = 2, seed: int = 0) -> AnnotationSelfAttention:
    torch.manual_seed(seed)
    return AnnotationSelfAttention(D, layers=layers, heads=4, ff_dim=32, dropout=0.0).eval()


def annotations(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))


def test_positional_encoding_layout() -> None:
    pe = positional_encoding_2d(H, W, D)
    assert pe.shape == (L, D) and pe.dtype == torch.get_default_dtype()
    assert pe.abs().max() <= 1.0
    grid = pe.view(H, W, D)  # row-major: entry r * W + c is cell (r, c)
    rows, cols = grid[..., : D // 2], grid[..., D // 2 :]
    assert torch.equal(rows, rows[:, :1].expand_as(rows))  # a row shares its row half
    assert torch.equal(cols, cols[:1].expand_as(cols))  # a column shares its column half
    assert torch.allclose(grid[0, 0], torch.tensor([0.0, 1.0] * (D // 2)))  # sin 0, cos 0
    row_pair = torch.stack([torch.tensor(2.0).sin(), torch.tensor(2.0).cos()])
    col_pair = torch.stack([torch.tensor(1.0).sin(), torch.tensor(1.0).cos()])
    assert torch.allclose(grid[2, 1, :2], row_pair)  # row 2, highest frequency
    assert torch.allclose(grid[2, 1, D // 2 : D // 2 + 2], col_pair)  # column 1
    assert torch.cdist(pe, pe).add(torch.eye(L)).min() > 1e-3  # distinct cells, distinct codes
    half = positional_encoding_2d(H, W, D, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), pe, atol=1e-3)


@pytest.mark.parametrize("dim", [6, 0])
def test_positional_encoding_needs_dim_divisible_by_4(dim: int) -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        positional_encoding_2d(H, W, dim)


def test_zero_layers_is_identity() -> None:
    sa = AnnotationSelfAttention(D, layers=0)
    assert list(sa.parameters()) == [] and sa.state_dict() == {}
    a = annotations()
    assert sa(a, (H, W)) is a
    assert AnnotationSelfAttention(6, layers=0, heads=4)(torch.zeros(1, 2, 6), (1, 2)).shape


def test_layers_shape_and_gradients() -> None:
    sa = make().train()
    a = annotations().requires_grad_()
    out = sa(a, (H, W))
    assert out.shape == (B, L, D) and out.isfinite().all()
    # a random projection: the plain sum of a LayerNorm output has zero gradient
    (out * torch.randn_like(out)).sum().backward()
    for name, p in sa.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert a.grad is not None and a.grad.abs().sum() > 0


@torch.no_grad()
def test_regions_see_each_other() -> None:
    a = annotations()
    b = a.clone()
    # a random nudge: a constant shift of a whole vector is what LayerNorm removes
    b[:, 5] += torch.randn(D, generator=torch.Generator().manual_seed(2))
    others = torch.arange(L) != 5
    for layers, mixes in [(2, True), (0, False)]:
        sa = make(layers)
        delta = (sa(b, (H, W)) - sa(a, (H, W))).abs().amax(dim=-1)  # (B, L)
        assert (delta[:, 5] > 1e-3).all()
        assert (delta[:, others] > 1e-6).all() if mixes else (delta[:, others] == 0).all()


@torch.no_grad()
def test_position_breaks_permutation_equivariance() -> None:
    sa, a = make(), annotations()
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sa(a[:, perm], (H, W)), sa(a, (H, W))[:, perm], atol=1e-4)
    sa.pos_scale.zero_()  # without positions, the layers are permutation-equivariant
    assert torch.allclose(sa(a[:, perm], (H, W)), sa(a, (H, W))[:, perm], atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"dim": D, "layers": 2, "heads": 3}, "heads must be"),
        ({"dim": D, "layers": 2, "heads": 0}, "heads must be"),
        ({"dim": D, "layers": -1}, "layers must be"),
        ({"dim": D, "layers": 1, "ff_dim": 0}, "ff_dim must be"),
        ({"dim": D, "layers": 1, "dropout": 1.0}, "dropout must be"),
        ({"dim": 6, "layers": 1, "heads": 2}, "divisible by 4"),  # D % 4 != 0
    ],
)
def test_bad_config(kwargs: dict, key: str) -> None:
    with pytest.raises(CaptionError, match=re.escape(key)) as err:
        AnnotationSelfAttention(**kwargs)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("layers", [0, 2])
def test_grid_must_match_annotations(layers: int) -> None:
    with pytest.raises(ValueError, match=r"do not fit a 4x4 grid"):
        make(layers)(annotations(), (4, 4))

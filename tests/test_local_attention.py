"""Local attention on the grid: the window, the Gaussian, both alignments, and the captioner."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from caption.data.vocab import PAD_ID
from caption.models.attention import SoftAttention
from caption.models.build import build_model
from caption.models.local import LocalAttention
from caption.models.scores import AdditiveScore
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.models import random_batch

H, D = 6, 5  # query and annotation sizes
SCORE = partial(AdditiveScore, hidden_dim=8)


def local(seed: int = 0, **options: object) -> LocalAttention:
    torch.manual_seed(seed)
    options.setdefault("hidden_dim", 8)
    return LocalAttention(SCORE, query_dim=H, key_dim=D, **options)


def centres(S: int) -> torch.Tensor:
    """(L, 2) cell centres in row-major order, built independently of the module."""
    return torch.tensor([[i + 0.5, j + 0.5] for i in range(S) for j in range(S)])


@pytest.mark.parametrize("alignment", LocalAttention.ALIGNMENTS)
@pytest.mark.parametrize("window, sigma", [(1, None), (2, None), (3, None), (2, 1e-3), (1, 5.0)])
def test_weights_are_a_distribution_on_the_window(
    alignment: str, window: int, sigma: float | None
) -> None:
    att = local(window=window, sigma=sigma, alignment=alignment)
    B, S = 8, 6
    g = torch.Generator().manual_seed(1)
    annotations = torch.randn(B, S * S, D, generator=g)
    memory = att.prepare(annotations)
    for _ in range(S + 2):  # enough monotonic steps to cross a row
        query = 4 * torch.randn(B, H, generator=g)  # spread p_t over the whole grid
        out = att(query, annotations, memory)
        alpha, p = out.alpha, att.last_position
        assert alpha.shape == (B, S * S) and p.shape == (B, 2)
        assert torch.isfinite(alpha).all() and (alpha >= 0).all()
        assert torch.allclose(alpha.sum(-1), torch.ones(B), atol=1e-6)
        assert ((p >= 0) & (p <= S)).all()
        inside = ((centres(S)[None] - p[:, None]).abs() <= window).all(-1)  # (B, L)
        assert (alpha[~inside] == 0).all()
        if sigma != 1e-3:  # a needle-thin Gaussian rightly underflows to 0 off its peak
            assert (alpha[inside] > 0).all()  # the window is exactly that square
        cell = p.floor().long().clamp(max=S - 1)
        assert torch.equal(out.location, cell[:, 0] * S + cell[:, 1])
        assert torch.allclose(out.context, torch.einsum("bl,bld->bd", alpha, annotations))


@pytest.mark.parametrize("alignment", LocalAttention.ALIGNMENTS)
def test_whole_grid_window_and_flat_gaussian_is_soft_attention(alignment: str) -> None:
    S = 5
    att = local(window=S, sigma=1e6, alignment=alignment)
    soft = SoftAttention(SCORE, query_dim=H, key_dim=D)
    soft.score.load_state_dict(att.score.state_dict())
    annotations, query = torch.randn(3, S * S, D), torch.randn(3, H)
    mem_local, mem_soft = att.prepare(annotations), soft.prepare(annotations)
    for _ in range(3):
        a, b = att(query, annotations, mem_local), soft(query, annotations, mem_soft)
        assert torch.allclose(a.alpha, b.alpha, atol=1e-6)
        assert torch.allclose(a.context, b.context, atol=1e-6)


def test_monotonic_walks_the_raster_order_and_restarts() -> None:
    S = 3
    L = S * S
    att = local(alignment="monotonic")
    assert att.W_p is None and att.v_p is None  # nothing to learn
    annotations = torch.randn(2, L, D)
    memory = att.prepare(annotations)
    for t in range(2 * L + 2):  # wraps after L
        out = att(torch.randn(2, H), annotations, memory)
        assert torch.equal(att.last_position, centres(S)[t % L].expand(2, 2))
        assert out.location.tolist() == [t % L] * 2
    att(torch.randn(2, H), annotations, att.prepare(annotations))  # a fresh sequence
    assert torch.equal(att.last_position, centres(S)[0].expand(2, 2))


def captioner(attention: str):
    torch.manual_seed(0)
    cfg = compose_config("train", [*TINY_MODEL, f"model/attention={attention}"])
    return build_model(cfg.model, vocab_size=20)


@pytest.mark.parametrize("attention", ["local", "local_monotonic"])
def test_captioner_trains_and_decodes(attention: str) -> None:
    model = captioner(attention)
    att = model.decoder.attention
    assert isinstance(att, LocalAttention)
    assert (att.W_p is not None) == (attention == "local")
    images, captions = random_batch()
    model.loss(images, captions).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    if att.W_p is not None:  # p_t learns through the Gaussian
        assert att.W_p.weight.grad.abs().sum() > 0 and att.v_p.weight.grad.abs().sum() > 0

    gen = model.eval().generate(images, strategy="beam", beam_size=3, max_len=6)
    real = gen.tokens != PAD_ID
    assert gen.alphas.shape == (len(images), gen.tokens.shape[1], 64)
    assert torch.allclose(gen.alphas.sum(-1)[real], torch.ones(int(real.sum())), atol=1e-5)
    assert ((gen.locations[real] >= 0) & (gen.locations[real] < 64)).all()


def test_non_square_grid_is_refused() -> None:
    with pytest.raises(ValueError, match=r"square grid.*L = 12"):
        local().prepare(torch.randn(2, 12, D))


@pytest.mark.parametrize(
    "key, value",
    [
        ("window", 0),
        ("window", 1.5),
        ("window", True),
        ("sigma", 0.0),
        ("sigma", -1.0),
        ("alignment", "diagonal"),
        ("hidden_dim", 0),
    ],
)
def test_bad_options_are_refused(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{key} must be"):
        local(**{key: value})


def test_location_cannot_be_forced() -> None:
    att = local()
    annotations = torch.randn(2, 9, D)
    with pytest.raises(ValueError, match="no location to force"):
        att(torch.randn(2, H), annotations, att.prepare(annotations), torch.zeros(2).long())

"""Score functions f_att: shapes, gradients, closed forms, and whole models built through Hydra."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from caption.data.vocab import END_ID, PAD_ID, START_ID
from caption.models.build import build_model
from caption.models.scores import AdditiveScore, DotScore, GeneralScore, ScaledDotScore
from tests.helpers import CONF
from tests.helpers.config import TINY_MODEL, compose_config

SCORES = {
    "additive": AdditiveScore,
    "dot": DotScore,
    "general": GeneralScore,
    "scaled_dot": ScaledDotScore,
}
B, L, D = 3, 5, 8
V = 20
DIMS = [(D, D), (12, D)]  # (H, D): the query already in the key space, and not


pytestmark = pytest.mark.usefixtures("one_thread")


def make_score(
    name: str, query_dim: int, key_dim: int, seed: int = 0, **options: object
) -> nn.Module:
    """The score as `conf/model/score/<name>.yaml` builds it, with `options` overriding it."""
    torch.manual_seed(seed)
    partial = instantiate(OmegaConf.load(CONF / "model" / "score" / f"{name}.yaml"))
    return partial(query_dim=query_dim, key_dim=key_dim, **options)


def inputs(query_dim: int, key_dim: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, query_dim, generator=g, requires_grad=True)
    a = torch.randn(B, L, key_dim, generator=g, requires_grad=True)
    return h, a


@pytest.mark.parametrize("H, D", DIMS, ids=["H==D", "H!=D"])
@pytest.mark.parametrize("name", SCORES)
def test_shapes_and_gradients(name: str, H: int, D: int) -> None:
    score = make_score(name, H, D)
    assert type(score) is SCORES[name]
    h, a = inputs(H, D)
    keys = score.keys(a)
    assert keys.shape[:2] == (B, L)
    e = score(h, keys)
    assert e.shape == (B, L) and torch.isfinite(e).all()
    # A random weighting, not a softmax: a softmax would hide the score's constant offsets.
    (e * torch.randn(B, L)).sum().backward()
    for tensor_name, t in [("query", h), ("annotations", a), *score.named_parameters()]:
        assert t.grad is not None, f"{tensor_name} got no gradient"
        assert torch.isfinite(t.grad).all(), f"{tensor_name} has a non-finite gradient"
        assert t.grad.abs().sum() > 0, f"{tensor_name} got an all-zero gradient"


@pytest.mark.parametrize("H, D", DIMS, ids=["H==D", "H!=D"])
def test_scaled_dot_is_dot_over_sqrt_d(H: int, D: int) -> None:
    dot, scaled = make_score("dot", H, D, seed=0), make_score("scaled_dot", H, D, seed=1)
    scaled.load_state_dict(dot.state_dict())  # strict: the same parameters
    h, a = inputs(H, D)
    expected = dot(h, dot.keys(a)) / math.sqrt(D)
    assert torch.equal(scaled(h, scaled.keys(a)), expected)


def test_dot_with_equal_sizes_is_parameter_free_einsum() -> None:
    dot = make_score("dot", D, D)
    assert list(dot.parameters()) == [] and dot.state_dict() == {}
    h, a = inputs(D, D)
    e = dot(h, dot.keys(a))
    assert torch.allclose(e, torch.einsum("bh,blh->bl", h, a), atol=1e-6)


def test_dot_with_different_sizes_projects_the_query_only() -> None:
    H = 12
    dot = make_score("dot", H, D)
    (W_q,) = dot.parameters()  # the bias-free projection is the only parameter
    assert W_q.shape == (D, H)
    h, a = inputs(H, D)
    e = dot(h, dot.keys(a))
    assert torch.allclose(e, torch.einsum("bh,dh,bld->bl", h, W_q, a), atol=1e-5)


@pytest.mark.parametrize("H, D", DIMS, ids=["H==D", "H!=D"])
def test_general_is_bilinear_einsum(H: int, D: int) -> None:
    general = make_score("general", H, D)
    (W,) = general.parameters()  # W alone: no bias
    assert W.shape == (H, D)
    h, a = inputs(H, D)
    e = general(h, general.keys(a))
    assert torch.allclose(e, torch.einsum("bh,hd,bld->bl", h, W, a), atol=1e-5)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_additive_is_the_mlp_formula(activation: str, grad: bool) -> None:
    """v_aᵀ act(W_a a_i + U_a h) + b_v, whether computed in one piece (training) or in chunks
    of cache-sized rows (inference), and through 2σ(2x) − 1 for tanh."""
    # Built with the activation, not switched afterwards: the constructor sets the fold.
    score = make_score("additive", 12, D, activation=activation)
    h, a = inputs(12, D)
    W, U, v = score.key_proj, score.query_proj, score.v
    act = torch.tanh if activation == "tanh" else torch.relu
    expected = v(act(W(a) + U(h).unsqueeze(1))).squeeze(-1)  # (B, L)
    with torch.set_grad_enabled(grad):
        e = score(h, score.keys(a))
    torch.testing.assert_close(e, expected, atol=1e-6, rtol=1e-5)
    assert e.requires_grad == grad


@pytest.mark.parametrize("K", [1, 3])
def test_additive_training_gradients(K: int, monkeypatch) -> None:
    """The hand-written backward of σ(k + q) w, chunked here one image at a time, against
    autograd's numerical gradient in float64, for one query per image and for K."""
    import caption.models.scores as scores

    monkeypatch.setattr(scores, "CHUNK_ELEMENTS", 1)
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(B, L, 6, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(B, K, 1, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scores._SigmoidLayer.apply, (keys, q, w))


@pytest.mark.parametrize("name", SCORES)
def test_queries_grouped_by_image_share_its_keys(name: str, monkeypatch) -> None:
    """K consecutive queries per image (beam search's hypotheses) score against that image's
    keys, computed once: the same scores as keys repeated K times, also when inference splits
    the batch into chunks (here of one image)."""
    import caption.models.scores as scores

    monkeypatch.setattr(scores, "CHUNK_ELEMENTS", 1)
    score = make_score(name, 12, D)
    K = 4
    g = torch.Generator().manual_seed(3)
    h, a = torch.randn(B * K, 12, generator=g), torch.randn(B, L, D, generator=g)
    with torch.no_grad():
        grouped = score(h, score.keys(a))  # (B*K, L)
        repeated = score(h, score.keys(a.repeat_interleave(K, dim=0)))
    assert grouped.shape == (B * K, L)
    torch.testing.assert_close(grouped, repeated, atol=1e-6, rtol=1e-5)


def random_batch(B: int = 3, T: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    """uint8 images (B, 3, 64, 64) and `<start>` ... `<end>` `<pad>`... captions (B, T)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, 3, 64, 64), dtype=torch.uint8, generator=g)
    captions = torch.randint(4, V, (B, T), generator=g)
    captions[:, 0] = START_ID
    for b, n in enumerate(range(T, T - B, -1)):  # lengths T, T-1, ...: some padding
        captions[b, n - 1] = END_ID
        captions[b, n:] = PAD_ID
    return images, captions


# The tiny model's D is the small CNN's last channel count (16); its H is 32.
SIZES = {"H!=D": [], "H==D": ["model.hidden_dim=16"]}


# H == D only where it changes the module: the dot scores then have no parameters at all.
CAPTIONER_CASES = [
    (name, attention, size)
    for name in SCORES
    for attention in ("soft", "hard")
    for size in SIZES
    if size == "H!=D" or name in ("dot", "scaled_dot")
]


@pytest.mark.parametrize(
    "name, attention, size", CAPTIONER_CASES, ids=["-".join(c) for c in CAPTIONER_CASES]
)
def test_captioner_with_score(name: str, attention: str, size: str) -> None:
    # TINY_MODEL sets the additive score's hidden size, a key the other scores do not have.
    tiny = [o for o in TINY_MODEL if name == "additive" or not o.startswith("model.score.")]
    overrides = [*tiny, f"model/score={name}", f"model/attention={attention}", *SIZES[size]]
    torch.manual_seed(0)
    model = build_model(compose_config("train", overrides).model, vocab_size=V)
    score = model.decoder.attention.score
    assert type(score) is SCORES[name]
    images, captions = random_batch(B=3)

    losses = model.loss(images, captions)
    assert torch.isfinite(losses.loss)
    losses.loss.backward()
    for param_name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{param_name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{param_name} has a non-finite gradient"

    with torch.no_grad():
        gen = model.eval().generate(images, strategy="beam", beam_size=2, max_len=5)
    real = gen.tokens != PAD_ID  # a word was generated at this step
    assert real.any()
    assert (gen.alphas >= 0).all()
    assert torch.allclose(gen.alphas.sum(-1)[real], torch.ones(int(real.sum())), atol=1e-5)

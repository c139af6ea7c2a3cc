"""Every equation of the decoder against a float64 reference written from the papers.

Each reference is the formula as printed (Xu et al. 2015; Luong et al. 2015; Vaswani et al.
2017), written with loops and einsums over tiny tensors and reading only the module's
parameters: no chunking, no 2σ(2x) − 1 folding, no packing, no precomputed keys. The
configuration (σ, the window, the deep output's activation, ...) is passed to the reference
by the test, never read back from the module, so a module that ignores an option disagrees.
Outputs and the gradients of a random linear functional of them, w.r.t. the inputs and every
parameter, must agree to float64 round-off. `make mutants` plants wrong versions of these
equations and checks that the tests here fail on each one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from caption.data.vocab import END_ID, PAD_ID, START_ID
from caption.models.attention import SoftAttention
from caption.models.captioner import Captioner
from caption.models.decoder import Decoder
from caption.models.local import LocalAttention
from caption.models.multihead import MultiHeadAttention
from caption.models.scores import AdditiveScore, DotScore, GeneralScore, ScaledDotScore

# float64 round-off through a few dozen operations, with a margin; a planted error is O(1e-2).
TOL = {"rtol": 1e-9, "atol": 1e-11}
DTYPE = torch.float64
B, S, D, H = 3, 3, 4, 6  # batch, grid side (L = S*S cells), annotation and LSTM sizes
L = S * S
V, M, A = 11, 5, 7  # vocabulary, embedding (deep output) size, additive hidden size
SCORES: dict[str, Callable[..., nn.Module]] = {
    "additive": partial(AdditiveScore, hidden_dim=A),
    "relu": partial(AdditiveScore, hidden_dim=A, activation="relu"),
    "dot": DotScore,
    "general": GeneralScore,
    "scaled_dot": ScaledDotScore,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    """A float64 leaf tensor that takes gradients."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=DTYPE)).requires_grad_()


def mat(W: Tensor, x: Tensor) -> Tensor:
    """W x for a matrix W (O, I) and x (..., I)."""
    return torch.einsum("oi,...i->...o", W, x)


def affine(layer: nn.Linear, x: Tensor) -> Tensor:
    """W x + b with an `nn.Linear`'s parameters, for any leading shape."""
    y = mat(layer.weight, x)
    return y if layer.bias is None else y + layer.bias


def sigmoid(x: Tensor) -> Tensor:
    return 1 / (1 + torch.exp(-x))


def normalise(w: Tensor) -> Tensor:
    """w_i / Σ_j w_j over the last axis."""
    return w / w.sum(dim=-1, keepdim=True)


def assert_same_function(
    actual: Sequence[Tensor], expected: Sequence[Tensor], wrt: Mapping[str, Tensor]
) -> None:
    """Equal outputs, and equal gradients w.r.t. `wrt` of Σ_k ⟨w_k, output_k⟩ for random w.

    A random functional rather than a sum: a sum is blind to errors that cancel over rows,
    and a softmax's outputs always sum to 1.
    """
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m, k=k: f"output {k}: {m}")
    g = torch.Generator().manual_seed(12345)
    weights = [torch.randn(e.shape, generator=g, dtype=DTYPE) for e in expected]
    names, leaves = list(wrt), list(wrt.values())

    def grads(outputs: Sequence[Tensor]) -> Sequence[Tensor]:
        total = sum((w * o).sum() for w, o in zip(weights, outputs, strict=True))
        if not total.requires_grad:  # constant outputs, e.g. a zero initial state
            return [torch.zeros_like(x) for x in leaves]
        # Retained: steps of one sequence share a graph (the keys `prepare` computed once).
        return torch.autograd.grad(
            total, leaves, allow_unused=True, materialize_grads=True, retain_graph=True
        )

    for name, ga, ge in zip(names, grads(actual), grads(expected), strict=True):
        torch.testing.assert_close(ga, ge, **TOL, msg=lambda m, n=name: f"∂/∂{n}: {m}")


def leaves_of(module: nn.Module, **inputs: Tensor) -> dict[str, Tensor]:
    """The inputs and every parameter of `module`, by name."""
    return {**inputs, **dict(module.named_parameters())}


# --- references ----------------------------------------------------------------------------


def score_reference(score: nn.Module, h: Tensor, a: Tensor, activation: str = "tanh") -> Tensor:
    """e_i = f_att(a_i, h) (B, L) for raw annotations a (B, L, D), one (b, i) at a time.

    additive (Bahdanau et al. 2015; Xu et al. eq. 4): e_i = v_aᵀ act(W_a a_i + U_a h) + b_v.
    dot (Luong et al. 2015): e_i = qᵀ a_i, q = h when H = D, else q = W_q h (bias-free).
    scaled dot (Vaswani et al. 2017): the dot score / √d_k, d_k = D.
    general (Luong et al. 2015): e_i = hᵀ W a_i.
    """
    act = {"tanh": torch.tanh, "relu": torch.relu}[activation]
    d_k = a.shape[-1]
    rows = []
    for b in range(len(h)):
        row = []
        for i in range(a.shape[1]):
            if isinstance(score, AdditiveScore):
                hidden = affine(score.key_proj, a[b, i]) + score.query_proj.weight @ h[b]
                e = score.v.weight[0] @ act(hidden) + score.v.bias[0]
            elif isinstance(score, DotScore):  # ScaledDotScore too
                q = h[b] if score.query_proj is None else score.query_proj.weight @ h[b]
                e = q @ a[b, i]
                if isinstance(score, ScaledDotScore):
                    e = e / math.sqrt(d_k)
            else:
                e = h[b] @ score.key_proj.weight @ a[b, i]
            row.append(e)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def soft_reference(att: SoftAttention, h: Tensor, a: Tensor, activation: str) -> tuple[Tensor, ...]:
    """Xu et al. eqs. 4-6, 13: α_i = exp(e_i) / Σ_j exp(e_j), ẑ = Σ_i α_i a_i."""
    alpha = normalise(torch.exp(score_reference(att.score, h, a, activation)))
    return torch.einsum("bi,bid->bd", alpha, a), alpha


def local_reference(
    att: LocalAttention,
    h: Tensor,
    a: Tensor,
    step: int,
    window: int,
    sigma: float | None,
    activation: str = "tanh",
) -> tuple[Tensor, ...]:
    """Luong et al. 2015 §3.2 on the S×S grid (design notes §1), cell by cell.

    p_t = S·(σ(v_yᵀ tanh(W_p h)), σ(v_xᵀ tanh(W_p h))) (predictive), or the centre of cell
    t mod L (monotonic). Cell (i, j) has centre c = (i + ½, j + ½); it is in the window when
    |c_y − p_y| ≤ D and |c_x − p_x| ≤ D, or when it contains p_t. In the window,
    α ∝ softmax(e)_i · exp(−‖c_i − p_t‖² / (2σ²)) with σ = D/2 by default; outside, α = 0.

    Returns:
        ẑ (B, D), α (B, L) and p_t (B, 2).
    """
    sigma = window / 2 if sigma is None else sigma
    side = math.isqrt(a.shape[1])
    if att.W_p is not None:
        p = side * sigmoid(affine(att.v_p, torch.tanh(affine(att.W_p, h))))
    else:
        t = step % a.shape[1]
        p = torch.tensor([t // side + 0.5, t % side + 0.5], dtype=DTYPE).expand(len(h), 2)
    e = score_reference(att.score, h, a, activation)
    alphas = []
    for b in range(len(h)):
        py, px = p[b]
        weights = []
        for i in range(side):
            for j in range(side):
                cy, cx = i + 0.5, j + 0.5
                near = abs(cy - py.item()) <= window and abs(cx - px.item()) <= window
                holds_p = (i, j) == (min(int(py), side - 1), min(int(px), side - 1))
                gauss = torch.exp(-((cy - py) ** 2 + (cx - px) ** 2) / (2 * sigma**2))
                weights.append(torch.exp(e[b, i * side + j]) * gauss * float(near or holds_p))
        alphas.append(normalise(torch.stack(weights)))
    alpha = torch.stack(alphas)
    return torch.einsum("bi,bid->bd", alpha, a), alpha, p


def multihead_reference(
    att: MultiHeadAttention, h: Tensor, a: Tensor, activation: str
) -> tuple[Tensor, ...]:
    """Multi-head attention (Vaswani et al. 2017 §3.2.2) over the annotations.

    Head j scores and averages V_j = W_v^j a (its rows of W_v); the context is
    W_o [c_1; ..; c_h] and the reported α the mean of the heads' α.
    """
    d = a.shape[-1] // len(att.attend)
    contexts, alphas = [], []
    for j, head in enumerate(att.attend):
        v_j = torch.einsum("ed,bld->ble", att.values.weight[j * d : (j + 1) * d], a)
        context, alpha = soft_reference(head, h, v_j, activation)
        contexts.append(context)
        alphas.append(alpha)
    context = torch.einsum("oi,bi->bo", att.out.weight, torch.cat(contexts, dim=-1))
    return context, sum(alphas) / len(alphas)


def lstm_reference(cell: nn.LSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Xu et al. eq. 1 with PyTorch's gate layout (i, f, g, o) of `nn.LSTMCell`'s weights."""
    n = h.shape[-1]
    z = mat(cell.weight_ih, x) + cell.bias_ih + mat(cell.weight_hh, h) + cell.bias_hh
    i, f, g, o = (z[..., k * n : (k + 1) * n] for k in range(4))
    c = sigmoid(f) * c + sigmoid(i) * torch.tanh(g)
    return sigmoid(o) * torch.tanh(c), c


def deep_output_reference(
    dec: Decoder, ey: Tensor, h: Tensor, z: Tensor, deep: bool, activation: str
) -> Tensor:
    """Xu et al. eq. 7: p(y_t) ∝ exp(L_o(E y_{t−1} + L_h h_t + L_z ẑ_t)), tanh optional
    (the authors' code); without the deep output, L_o h_t."""
    if not deep:
        return affine(dec.L_o, h)
    inner = ey + mat(dec.L_h.weight, h) + mat(dec.L_z.weight, z)
    return affine(dec.L_o, torch.tanh(inner) if activation == "tanh" else inner)


# --- the decoder, built from the same options the reference reads --------------------------

DEFAULTS: dict[str, Any] = {
    "attention": "soft",  # soft | local
    "score": "additive",
    "window": 1,
    "sigma": None,
    "alignment": "predictive",
    "init_from_mean": True,
    "gate": True,
    "deep_output": True,
    "deep_output_activation": "none",
    "heads": 1,
    "input_feeding": False,
}


def make_decoder(seed: int = 0, **options: Any) -> Decoder:
    """A float64 decoder without dropout, built from `DEFAULTS` updated by `options`."""
    o = {**DEFAULTS, **options}
    attention: Callable[..., nn.Module] = SoftAttention
    if o["attention"] == "local":
        attention = partial(
            LocalAttention,
            window=o["window"],
            sigma=o["sigma"],
            alignment=o["alignment"],
            hidden_dim=5,
        )
    torch.manual_seed(seed)
    dec = Decoder(
        V,
        D,
        attention,
        SCORES[o["score"]],
        embed_dim=M,
        hidden_dim=H,
        dropout=0.0,
        init_from_mean=o["init_from_mean"],
        gate=o["gate"],
        deep_output=o["deep_output"],
        deep_output_activation=o["deep_output_activation"],
        heads=o["heads"],
        input_feeding=o["input_feeding"],
    )
    return dec.double()


def activation_of(o: Mapping[str, Any]) -> str:
    return "relu" if o["score"] == "relu" else "tanh"


def attention_reference(
    dec: Decoder, h: Tensor, a: Tensor, step: int, o: Mapping[str, Any]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(Σ_i α_ti a_i, α_t, p_t or None) of the attention the options describe."""
    if o["heads"] > 1:
        return *multihead_reference(dec.attention, h, a, activation_of(o)), None
    if o["attention"] == "local":
        return local_reference(dec.attention, h, a, step, o["window"], o["sigma"], activation_of(o))
    return *soft_reference(dec.attention, h, a, activation_of(o)), None


def init_reference(dec: Decoder, a: Tensor, from_mean: bool) -> tuple[Tensor, Tensor]:
    """Xu et al. §3.1.2: c₀ = f_init,c(1/L Σ_i a_i), h₀ = f_init,h(1/L Σ_i a_i), one tanh
    layer each; zeros when the MLPs are switched off."""
    if not from_mean:
        return a.new_zeros(len(a), H), a.new_zeros(len(a), H)
    mean = sum(a[:, i] for i in range(a.shape[1])) / a.shape[1]
    return torch.tanh(affine(dec.init_h[0], mean)), torch.tanh(affine(dec.init_c[0], mean))


def gate_reference(dec: Decoder, h_prev: Tensor, context: Tensor, gate: bool) -> tuple[Tensor, ...]:
    """Xu et al. §4.2.1: β_t = σ(f_β(h_{t−1})), a scalar, and ẑ_t = β_t Σ_i α_ti a_i."""
    if not gate:
        return context, h_prev.new_ones(len(h_prev))
    beta = sigmoid(h_prev @ dec.f_beta.weight[0] + dec.f_beta.bias[0])  # (B,)
    return beta.unsqueeze(-1) * context, beta


def decoder_reference(
    dec: Decoder, a: Tensor, caption: Tensor, o: Mapping[str, Any]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The teacher-forced soft decoder of Xu et al. §3.1.2 on one caption, without padding.

    Per step: attend with h_{t−1}, gate, LSTM on [E y_{t−1}; ẑ_t (; h̃_{t−1})], deep output;
    with input feeding h̃_t = tanh(W_c [ẑ_t; h_t]) (Luong et al. 2015 §3.3), h̃_0 = 0.

    Args:
        a: (L, D) one image's annotation vectors.
        caption: (n + 1,) `<start> w_1 .. <end>`, no `<pad>`.
        o: the options the decoder was built with.

    Returns:
        logits (n, V), α (n, L) and, for local attention, p_t (n, 2).
    """
    a = a.unsqueeze(0)
    h, c = init_reference(dec, a, o["init_from_mean"])
    feed = a.new_zeros(1, H)
    logits, alphas, positions = [], [], []
    for t in range(len(caption) - 1):
        ey = dec.embed.weight[caption[t]].unsqueeze(0)  # E y_{t−1}
        context, alpha, p = attention_reference(dec, h, a, t, o)
        z, _ = gate_reference(dec, h, context, o["gate"])
        x = torch.cat([ey, z, feed] if o["input_feeding"] else [ey, z], dim=-1)
        h, c = lstm_reference(dec.lstm, x, h, c)
        if o["input_feeding"]:
            feed = torch.tanh(affine(dec.W_c, torch.cat([z, h], dim=-1)))
        logit = deep_output_reference(dec, ey, h, z, o["deep_output"], o["deep_output_activation"])
        logits.append(logit)
        alphas.append(alpha)
        positions.append(p)
    position = torch.cat(positions) if positions[0] is not None else None
    return torch.cat(logits), torch.cat(alphas), position


def make_captions(lengths: Sequence[int], seed: int = 7) -> Tensor:
    """`<start> w .. <end> <pad>..` with `lengths[b]` targets each (`<end>` included)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + 1
    captions = torch.randint(4, V, (len(lengths), T), generator=g)
    captions[:, 0] = START_ID
    for b, n in enumerate(lengths):
        captions[b, n] = END_ID
        captions[b, n + 1 :] = PAD_ID
    return captions


LENGTHS = (3, 1, 2)  # unsorted, with a one-word caption: the packing reorders and shrinks


def padded(rows: Sequence[Tensor], T: int) -> Tensor:
    """Stack (n_b, ...) rows into (B, T, ...), zeros after each row's end."""
    return torch.stack([torch.cat([r, r.new_zeros(T - len(r), *r.shape[1:])]) for r in rows])


# --- scores --------------------------------------------------------------------------------


@pytest.mark.parametrize("query_dim", [D, H], ids=["H==D", "H!=D"])
@pytest.mark.parametrize("name", SCORES)
def test_score_matches_reference(name: str, query_dim: int) -> None:
    """f_att of Xu et al. eq. 4 (additive, tanh or relu), Luong et al. 2015 §3.1 (dot,
    general) and Vaswani et al. 2017 eq. 1 (e = qᵀa / √d_k), against `score_reference`,
    as training computes it (with gradients)."""
    torch.manual_seed(0)
    score = SCORES[name](query_dim=query_dim, key_dim=D).double()
    if name in ("dot", "scaled_dot") and query_dim == D:
        assert list(score.parameters()) == []  # q = h: nothing to learn
    h, a = randn(B, query_dim, seed=1), randn(B, L, D, seed=2)
    e = score(h, score.keys(a))
    expected = score_reference(score, h, a, "relu" if name == "relu" else "tanh")
    assert_same_function([e], [expected], leaves_of(score, query=h, annotations=a))


@pytest.mark.parametrize("chunk", [None, 1], ids=["one-chunk", "chunk-per-image"])
@pytest.mark.parametrize("name", ["additive", "relu"])
def test_additive_inference_matches_reference(
    name: str, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """e_i = v_aᵀ act(W_a a_i + U_a h) + b_v on inference's chunked path, K = 2 queries per
    image as in beam search, against the per-(query, cell) reference."""
    import caption.models.scores as scores

    if chunk is not None:
        monkeypatch.setattr(scores, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    score = SCORES[name](query_dim=H, key_dim=D).double()
    activation = "relu" if name == "relu" else "tanh"
    h, a = randn(2 * B, H, seed=1), randn(B, L, D, seed=2)
    with torch.no_grad():
        e = score(h, score.keys(a))
        expected = score_reference(score, h, a.repeat_interleave(2, dim=0), activation)
    torch.testing.assert_close(e, expected, **TOL)


def test_scaled_dot_divides_by_sqrt_of_key_dim() -> None:
    """Vaswani et al. 2017 eq. 1: the scaled score is exactly the dot score / √d_k, here with
    d_k = 9, where / d_k, / √d_k and no scaling all differ."""
    torch.manual_seed(0)
    dot, scaled = DotScore(H, 9).double(), ScaledDotScore(H, 9).double()
    scaled.load_state_dict(dot.state_dict())
    h, a = randn(B, H, seed=1), randn(B, L, 9, seed=2)
    ratio = dot(h, dot.keys(a)) / scaled(h, scaled.keys(a))
    torch.testing.assert_close(ratio, torch.full_like(ratio, 3.0), **TOL)


# --- weightings ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["additive", "general"])
def test_soft_attention_matches_reference(name: str) -> None:
    """Xu et al. eqs. 5-6 and 13: α = softmax(e), ẑ = Σ_i α_i a_i."""
    torch.manual_seed(0)
    att = SoftAttention(SCORES[name], query_dim=H, key_dim=D).double()
    h, a = randn(B, H, seed=1), randn(B, L, D, seed=2)
    out = att(h, a, att.prepare(a))
    expected = soft_reference(att, h, a, "tanh")
    assert_same_function([out.context, out.alpha], expected, leaves_of(att, query=h, annotations=a))


LOCAL_CASES = [(1, None), (2, None), (1, 0.7)]  # (D, σ): σ = None is D/2


@pytest.mark.parametrize("window, sigma", LOCAL_CASES, ids=["D=1", "D=2", "D=1,sigma=0.7"])
@pytest.mark.parametrize("alignment", LocalAttention.ALIGNMENTS)
def test_local_attention_matches_reference(
    alignment: str, window: int, sigma: float | None
) -> None:
    """Luong et al. 2015 §3.2 on the 4×4 grid (design notes §1): the predicted or raster
    p_t, the square window |c − p_t| ≤ D per axis, and the Gaussian with σ = D/2.

    Monotonic alignment puts p_t on a cell centre, so cells lie exactly D away from it: the
    window's ≤ is tested there. Its L + 1 steps also cover the wrap after L.
    """
    side = 4
    torch.manual_seed(0)
    att = LocalAttention(
        SCORES["additive"], H, D, window=window, sigma=sigma, alignment=alignment, hidden_dim=5
    ).double()
    a = randn(B, side * side, D, seed=2)
    memory = att.prepare(a)
    steps = side * side + 1 if alignment == "monotonic" else 2
    for t in range(steps):
        h = randn(B, H, seed=10 + t, scale=3.0)  # p_t spread over the grid
        out = att(h, a, memory)
        context, alpha, p = local_reference(att, h, a, t, window, sigma)
        torch.testing.assert_close(out.position, p.detach(), **TOL)
        assert_same_function(
            [out.context, out.alpha], [context, alpha], leaves_of(att, query=h, annotations=a)
        )


def test_multi_head_attention_matches_reference() -> None:
    """Vaswani et al. 2017 §3.2.2 on the annotations: head j over W_v^j a, the context
    W_o [c_1; c_2], and α the mean of the heads' α."""
    dec = make_decoder(heads=2)
    att = dec.attention
    h, a = randn(B, H, seed=1), randn(B, L, D, seed=2)
    out = att(h, a, att.prepare(a))
    expected = multihead_reference(att, h, a, "tanh")
    assert_same_function([out.context, out.alpha], expected, leaves_of(att, query=h, annotations=a))


# --- the decoder's equations, one at a time ------------------------------------------------


@pytest.mark.parametrize("from_mean", [True, False], ids=["mean", "zeros"])
def test_initial_state_matches_reference(from_mean: bool) -> None:
    """Xu et al. §3.1.2: h₀ = f_init,h(1/L Σ_i a_i), c₀ = f_init,c(1/L Σ_i a_i)."""
    dec = make_decoder(init_from_mean=from_mean)
    a = randn(B, L, D, seed=2)
    assert_same_function(
        dec.init_state(a), init_reference(dec, a, from_mean), leaves_of(dec, annotations=a)
    )


def step_inputs(dec: Decoder, feed: bool) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """Annotations, previous words and a random state (h_{t−1}, c_{t−1}(, h̃_{t−1}))."""
    a = randn(B, L, D, seed=2)
    y = torch.tensor([4, 7, 9])[:B]
    state = tuple(randn(B, H, seed=20 + k, scale=0.5) for k in range(3 if feed else 2))
    return a, y, state


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-gate"])
def test_gate_and_lstm_step_match_reference(gate: bool) -> None:
    """Xu et al. §4.2.1 and eq. 1: β_t = σ(f_β(h_{t−1})), ẑ_t = β_t Σ_i α_ti a_i with α from
    h_{t−1}, then the LSTM on [E y_{t−1}; ẑ_t] gives (h_t, c_t)."""
    dec = make_decoder(gate=gate)
    a, y, (h, c) = step_inputs(dec, feed=False)
    gates_in = dec.input_gates(dec.embed(y))
    (h_t, c_t), z, att, beta = dec.advance(
        gates_in, (h, c), a, dec.attention.prepare(a), dec.recurrent_weight()
    )
    context, alpha = soft_reference(dec.attention, h, a, "tanh")
    z_ref, beta_ref = gate_reference(dec, h, context, gate)
    x = torch.cat([dec.embed.weight[y], z_ref], dim=-1)
    h_ref, c_ref = lstm_reference(dec.lstm, x, h, c)
    assert_same_function(
        [z, beta, att.alpha, h_t, c_t],
        [z_ref, beta_ref, alpha, h_ref, c_ref],
        leaves_of(dec, annotations=a, h=h, c=c),
    )


def test_input_feeding_matches_reference() -> None:
    """Luong et al. 2015 §3.3: h̃_t = tanh(W_c [ẑ_t; h_t]) of this step's h_t, fed to the
    LSTM with the next word: x_{t+1} = [E y_t; ẑ_{t+1}; h̃_t]."""
    dec = make_decoder(input_feeding=True)
    a, y, (h, c, feed) = step_inputs(dec, feed=True)
    state, z, att, beta = dec.advance(
        dec.input_gates(dec.embed(y)),
        (h, c, feed),
        a,
        dec.attention.prepare(a),
        dec.recurrent_weight(),
    )
    context, _ = soft_reference(dec.attention, h, a, "tanh")
    z_ref, _ = gate_reference(dec, h, context, gate=True)
    x = torch.cat([dec.embed.weight[y], z_ref, feed], dim=-1)
    h_ref, c_ref = lstm_reference(dec.lstm, x, h, c)
    feed_ref = torch.tanh(affine(dec.W_c, torch.cat([z_ref, h_ref], dim=-1)))
    assert_same_function(
        state, [h_ref, c_ref, feed_ref], leaves_of(dec, annotations=a, h=h, c=c, feed=feed)
    )


@pytest.mark.parametrize(
    "deep, activation",
    [(True, "none"), (True, "tanh"), (False, "none")],
    ids=["paper", "tanh", "L_o h"],
)
def test_deep_output_matches_reference(deep: bool, activation: str) -> None:
    """Xu et al. eq. 7: p(y_t) ∝ exp(L_o(E y_{t−1} + L_h h_t + L_z ẑ_t)), with the authors'
    tanh before L_o as an option, or L_o h_t without the deep output."""
    dec = make_decoder(deep_output=deep, deep_output_activation=activation)
    ey, h, z = randn(B, M, seed=1), randn(B, H, seed=2), randn(B, D, seed=3)
    expected = deep_output_reference(dec, ey, h, z, deep, activation)
    assert_same_function([dec.output(ey, h, z)], [expected], leaves_of(dec, ey=ey, h=h, z=z))


# --- whole sequences -----------------------------------------------------------------------

DECODERS: dict[str, dict[str, Any]] = {
    "paper": {},
    "tanh-output,relu-score": {"deep_output_activation": "tanh", "score": "relu"},
    "input-feeding,general": {"input_feeding": True, "score": "general"},
    "local": {"attention": "local"},
    # D = 2: in a window two cells wide, an L1 Gaussian gives the same α as the squared
    # distance (|d + 1| − |d| = (d + 1)² − d² for −1 < d < 0), so D = 1 alone cannot tell them.
    "local-monotonic,dot,D=2": {
        "attention": "local",
        "alignment": "monotonic",
        "score": "dot",
        "window": 2,
    },
    "two-heads,scaled-dot": {"heads": 2, "score": "scaled_dot"},
    "no-gate,zero-init,no-deep-output": {
        "gate": False,
        "init_from_mean": False,
        "deep_output": False,
    },
}


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_matches_reference(name: str) -> None:
    """The whole teacher-forced decoder of Xu et al. §3.1.2 (init, attention with h_{t−1},
    gate, LSTM, deep output) over padded captions of 3, 1 and 2 words, against one caption
    at a time from the equations: `Decoder.forward`'s logits and α (zeros after `<end>`),
    and local attention's p_t, which must come from h_{t−1}."""
    o = {**DEFAULTS, **DECODERS[name]}
    dec = make_decoder(**o)
    a = randn(B, L, D, seed=1)
    captions = make_captions(LENGTHS)
    out = dec(a, captions)
    refs = [decoder_reference(dec, a[b], captions[b, : n + 1], o) for b, n in enumerate(LENGTHS)]
    T = captions.shape[1] - 1
    expected = [padded([r[0] for r in refs], T), padded([r[1] for r in refs], T)]
    assert_same_function([out.logits, out.alphas], expected, leaves_of(dec, annotations=a))
    if o["attention"] == "local":
        for b, n in enumerate(LENGTHS):
            torch.testing.assert_close(out.positions[b, :n], refs[b][2].detach(), **TOL)


class GridEncoder(nn.Module):
    """A stand-in encoder: images (B, 3, S, S) -> annotations (B, S*S, D) by a 1×1 conv."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.proj = nn.Linear(3, out_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images.flatten(2).transpose(1, 2))

    def grid_shape(self, size: int) -> tuple[int, int]:
        return size, size


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_padded_batch_loss_counts_real_words_only(lam: float) -> None:
    """Xu et al. eq. 14 over a padded batch: NLL = Σ_b Σ_{t ≤ n_b} −log p(y_t) / Σ_b n_b,
    with every caption's `<end>` and no `<pad>`, and the penalty λ Σ_b Σ_i (1 − Σ_{t ≤ n_b} α_ti)²
    over real steps only, divided by the same word count (the authors' objective times B / Σ n_b,
    so λ is their alpha_c), each caption decoded on its own without padding. The logged
    `attention_reg` is the penalty per caption."""
    torch.manual_seed(0)
    model = Captioner(
        GridEncoder(D),
        SoftAttention,
        SCORES["additive"],
        vocab_size=V,
        doubly_stochastic=lam,
        embed_dim=M,
        hidden_dim=H,
        dropout=0.0,
    ).double()
    images = randn(B, 3, S, S, seed=3)
    captions = make_captions(LENGTHS)
    losses = model.loss(images, captions)
    a = model.encode(images)
    nll, penalty = 0.0, 0.0
    for b, n in enumerate(LENGTHS):
        logits, alpha, _ = decoder_reference(model.decoder, a[b], captions[b, : n + 1], DEFAULTS)
        log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        nll = nll - sum(log_p[t, captions[b, t + 1]] for t in range(n))
        penalty = penalty + ((1 - alpha.sum(dim=0)) ** 2).sum()
    words = sum(LENGTHS)
    assert_same_function(
        [losses.nll, losses.attention_reg, losses.loss],
        [nll / words, penalty / B, (nll + lam * penalty) / words],
        leaves_of(model, images=images),
    )

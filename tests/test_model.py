"""The captioner on tiny tensors: gradients, the loss, overfitting, and decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caption.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID
from caption.errors import CaptionError
from caption.models.captioner import Captioner
from tests.helpers.models import V, random_batch, tiny_model

VARIANTS = [
    [],
    ["model.gate=false"],
    ["model.deep_output=false"],
    ["model.deep_output_activation=tanh"],
    ["model.init_from_mean=false"],
    ["model.doubly_stochastic=1.0"],
    ["model.dropout=0"],
    ["model.score.activation=relu"],
    ["model.encoder.coord_channels=false"],
    ["model.heads=4"],
    ["model.input_feeding=true"],
    ["model.heads=2", "model.input_feeding=true"],
    ["model/attention=hard"],
    ["model/attention=hard", "model.input_feeding=true"],
    ["model/attention=hard", "model.attention.samples=3", "model.attention.coin=batch"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(o) or "default")
def test_forward_backward(overrides: list[str]) -> None:
    model = tiny_model(*overrides)
    images, captions = random_batch()
    out = model(images, captions)
    logits, alphas = out.logits, out.alphas
    B, T = captions.shape
    L = 8 * 8  # 64 px through the small CNN
    assert logits.shape == (B, T - 1, V) and alphas.shape == (B, T - 1, L)
    real = (captions[:, 1:] != PAD_ID).float()  # steps after <end> are not computed: α = 0
    assert torch.allclose(alphas.sum(-1), real, atol=1e-5)
    losses = model.loss(images, captions)
    assert torch.isfinite(losses.loss)
    losses.loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_loss_ignores_padding() -> None:
    model = tiny_model().eval()
    images, captions = random_batch()
    padded = torch.cat([captions, torch.full((len(captions), 3), PAD_ID)], dim=1)
    a, b = model.loss(images, captions), model.loss(images, padded)
    assert torch.allclose(a.nll, b.nll, atol=1e-6)
    assert torch.allclose(a.attention_reg, b.attention_reg, atol=1e-5)


def test_doubly_stochastic_weight_scales_the_penalty() -> None:
    images, captions = random_batch()
    off = tiny_model("model.doubly_stochastic=0").eval().loss(images, captions)
    on = tiny_model("model.doubly_stochastic=2.5").eval().loss(images, captions)
    assert torch.allclose(off.loss, off.nll)
    # attention_reg is logged per caption; the loss normalises it like the NLL, per word.
    per_word = len(captions) / (captions[:, 1:] != PAD_ID).sum()
    assert torch.allclose(on.loss, on.nll + 2.5 * on.attention_reg * per_word)
    assert on.attention_reg > 0


def test_overfits_one_batch() -> None:
    model = tiny_model("model.dropout=0", "model.doubly_stochastic=0")
    images, captions = random_batch(B=6, T=8, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = model.loss(images, captions).nll
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.5 and loss.item() < 0.05, (first, loss.item())
    # ...and decoding reproduces the memorised captions word for word.
    gen = model.eval().generate(images, strategy="greedy", max_len=8)
    for b in range(len(images)):
        n = int((captions[b] != PAD_ID).sum()) - 1
        assert gen.tokens[b, :n].tolist() == captions[b, 1 : n + 1].tolist()


def sequence_log_prob(model: Captioner, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens | image) under teacher forcing, `<end>` included, `<pad>` excluded."""
    captions = torch.cat([torch.full((len(tokens), 1), START_ID), tokens], dim=1)
    logits = model(images, captions).logits
    logits[..., [PAD_ID, START_ID, UNK_ID]] = float("-inf")  # generation forbids these three
    logp = F.log_softmax(logits, -1).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(tokens == PAD_ID, 0.0).sum(1)


@pytest.mark.parametrize("strategy, beam", [("greedy", 1), ("beam", 3), ("beam", 5)])
def test_generate_batched_equals_one_at_a_time(strategy: str, beam: int) -> None:
    model = tiny_model(seed=3).eval()
    images, _ = random_batch(B=5, seed=2)
    batched = model.generate(images, strategy=strategy, beam_size=beam, max_len=10)
    for b in range(len(images)):
        single = model.generate(images[b : b + 1], strategy=strategy, beam_size=beam, max_len=10)
        n = single.tokens.shape[1]
        assert batched.tokens[b, :n].tolist() == single.tokens[0].tolist()
        assert (batched.tokens[b, n:] == PAD_ID).all()
        assert torch.allclose(batched.log_probs[b], single.log_probs[0], atol=1e-4)
        assert torch.allclose(batched.alphas[b, :n], single.alphas[0], atol=1e-5)


def test_beam_scores_are_sequence_log_probabilities() -> None:
    model = tiny_model(seed=4).eval()
    images, _ = random_batch(B=4, seed=5)
    gen = model.generate(images, strategy="beam", beam_size=4, max_len=12)
    # log_probs are those of the returned captions under teacher forcing, <end> included.
    assert torch.allclose(gen.log_probs, sequence_log_prob(model, images, gen.tokens), atol=1e-4)
    # (Beam search is not guaranteed to beat greedy decoding: greedy's path may be pruned.
    # What the search does guarantee is checked in tests/test_beam_search.py.)


def test_beam_of_one_is_greedy() -> None:
    model = tiny_model(seed=6).eval()
    images, _ = random_batch(B=3, seed=7)
    a = model.generate(images, strategy="greedy", max_len=9)
    b = model.generate(images, strategy="beam", beam_size=1, max_len=9)
    assert torch.equal(a.tokens, b.tokens)


def test_beam_without_end_returns_best_unfinished() -> None:
    model = tiny_model(seed=8).eval()
    with torch.no_grad():
        # <end> becomes impossible; a merely unlikely one (finite log p) would be a finished
        # caption, which beam search prefers to any unfinished one.
        model.decoder.L_o.bias[END_ID] = float("-inf")
    images, _ = random_batch(B=3, seed=9)
    gen = model.generate(images, strategy="beam", beam_size=3, max_len=6)
    assert gen.tokens.shape == (3, 6)
    assert not (gen.tokens == END_ID).any() and not (gen.tokens == PAD_ID).any()
    assert torch.isfinite(gen.log_probs).all()
    assert torch.allclose(gen.log_probs, sequence_log_prob(model, images, gen.tokens), atol=1e-3)


def test_generated_attention_is_returned_per_word() -> None:
    model = tiny_model(seed=10).eval()
    images, _ = random_batch(B=2, seed=11)
    for strategy in ("greedy", "beam", "sample"):
        gen = model.generate(images, strategy=strategy, beam_size=3, max_len=8)
        B, T = gen.tokens.shape
        assert gen.alphas.shape == (B, T, 64) and gen.betas.shape == (B, T)
        assert gen.grid == (8, 8)
        real = gen.tokens != PAD_ID  # a word was generated at this step
        assert torch.allclose(gen.alphas.sum(-1)[real], torch.ones(int(real.sum())), atol=1e-5)
        assert (gen.alphas.sum(-1)[~real] == 0).all()
        assert ((gen.betas[real] > 0) & (gen.betas[real] < 1)).all()


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = tiny_model(seed=12).eval()
    images, _ = random_batch(B=3, seed=13)
    torch.manual_seed(0)
    a = model.generate(images, strategy="sample", max_len=8, temperature=1.5)
    torch.manual_seed(0)
    b = model.generate(images, strategy="sample", max_len=8, temperature=1.5)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="strategy"):
        model.generate(images, strategy="nucleus")


def test_one_head_is_single_head_attention() -> None:
    one = tiny_model("model.heads=1", seed=21)
    assert not hasattr(one.decoder.attention, "attend")  # the plain weighting, no wrapper
    two = tiny_model("model.heads=2", seed=21)
    assert len(two.decoder.attention.attend) == 2
    images, captions = random_batch()
    out = two.eval()(images, captions)
    real = (captions[:, 1:] != PAD_ID).float()
    assert torch.allclose(out.alphas.sum(-1), real, atol=1e-5)


def test_multi_head_refuses_hard_attention() -> None:
    with pytest.raises(CaptionError, match=r"model\.heads"):
        tiny_model("model.heads=2", "model/attention=hard")


def test_input_feeding_feeds_the_attentional_vector() -> None:
    model = tiny_model("model.input_feeding=true", "model.dropout=0").eval()
    images, captions = random_batch()
    base = model(images, captions).logits
    with torch.no_grad():  # h̃ enters the LSTM: changing W_c changes later words, not the first
        model.decoder.W_c.weight.add_(0.5)
    changed = model(images, captions).logits
    assert torch.allclose(base[:, 0], changed[:, 0])
    assert not torch.allclose(base[:, 1:], changed[:, 1:])

"""Stochastic hard attention: the Monte Carlo estimator against the exact gradient of L_s."""

from __future__ import annotations

import itertools

import pytest
import torch

from caption.data.vocab import END_ID, PAD_ID, START_ID
from caption.models.attention import HardAttention
from caption.models.build import build_model
from caption.models.captioner import Captioner
from tests.helpers.config import EXACT_HARD, NANO_MODEL, compose_config

V = 12
MICRO = [*NANO_MODEL, *EXACT_HARD]  # 16 px -> 4x4 grid: 16^2 location paths for 2 words


def micro_model(*overrides: str, seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    model = build_model(compose_config("train", [*MICRO, *overrides]).model, vocab_size=V)
    model.train()
    model.encoder.eval()  # BatchNorm batch statistics would couple the copies of one image
    return model


def grads(model: Captioner) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def exact_gradient(model: Captioner, image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """∇ of -L_s / n_words, L_s = Σ_s p(s|a) log p(y|s,a), by enumerating every location path."""
    steps = caption.shape[1] - 1
    L = 16
    paths = torch.tensor(list(itertools.product(range(L), repeat=steps)))  # (L^steps, steps)
    n = len(paths)
    out = model(image.expand(n, -1, -1, -1), caption.expand(n, -1), locations=paths)
    log_p_s = out.location_log_probs.sum(1)  # (n,) log p(s | a)
    targets = caption[:, 1:].expand(n, -1)
    log_p_y = out.logits.log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1).sum(1)
    assert torch.allclose(log_p_s.exp().sum(), torch.tensor(1.0), atol=1e-5)  # a distribution
    lower_bound = (log_p_s.exp() * log_p_y).sum()
    model.zero_grad()
    (-lower_bound / steps).backward()
    return grads(model)


def estimates(
    model: Captioner,
    image: torch.Tensor,
    caption: torch.Tensor,
    k: int,
    m: int,
    fix_baseline: float | None = None,
) -> torch.Tensor:
    """k independent Monte Carlo gradient estimates, each from `Captioner.loss` on m samples."""
    out = []
    for _ in range(k):
        if fix_baseline is not None:
            model.decoder.attention.baseline.fill_(fix_baseline)
        model.zero_grad()
        model.loss(image.expand(m, -1, -1, -1), caption.expand(m, -1)).loss.backward()
        out.append(grads(model))
    return torch.stack(out)


def example() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 16, 16, generator=g)
    caption = torch.tensor([[START_ID, 7, END_ID]])
    return image, caption


def test_monte_carlo_gradient_matches_the_exact_lower_bound_gradient() -> None:
    model = micro_model()
    image, caption = example()
    exact = exact_gradient(model, image, caption)
    torch.manual_seed(123)
    est = estimates(model, image, caption, k=150, m=64)
    mean, stderr = est.mean(0), est.std(0) / est.shape[0] ** 0.5
    random = stderr > 1e-9  # parameters the sampled location actually reaches
    # Float rounding of the 256-path sum: v_a's bias has an exact gradient of 0 (a softmax
    # ignores shifts), yet comes out at ~4e-7 with a spread of only ~2e-9 across estimates.
    rounding = 1e-6
    z = ((mean - exact).abs() - rounding).clamp(min=0)[random] / stderr[random]
    assert random.sum() > 50
    assert z.abs().max() < 5.0, z.abs().max()
    assert (z**2).mean() < 2.0  # ~1 for an unbiased estimator
    # Deterministic parts must agree exactly.
    torch.testing.assert_close(mean[~random], exact[~random], atol=1e-6, rtol=1e-4)
    # And the bias a wrong estimator would have is far outside this tolerance: dropping the
    # score-function term (plain backprop through the sample) is detectably wrong.
    model.decoder.attention.reward_weight = 0.0
    torch.manual_seed(123)
    wrong = estimates(model, image, caption, k=150, m=64).mean(0)
    z_wrong = (wrong - exact)[random] / stderr[random]
    assert z_wrong.abs().max() > 10


def test_baseline_reduces_the_estimator_variance() -> None:
    model = micro_model("model.attention.reward_weight=0.1")
    image, caption = example()
    torch.manual_seed(7)
    warm = estimates(model, image, caption, k=30, m=8)  # let the moving average settle
    b = model.decoder.attention.baseline.item()
    assert b < -1  # it tracks log p(y|s,a), far from 0 for an untrained model
    with_baseline = estimates(model, image, caption, k=200, m=8)
    without = estimates(model, image, caption, k=200, m=8, fix_baseline=0.0)
    ratio = with_baseline.var(0).sum() / without.var(0).sum()
    assert ratio < 0.5, ratio
    assert warm.shape[0] == 30


def test_baseline_moving_average_is_a_buffer() -> None:
    att = micro_model("model.attention.baseline_decay=0.9").decoder.attention
    assert isinstance(att, HardAttention)
    yes = torch.tensor([True])
    att.update_baseline(torch.tensor([-10.0]), yes)
    assert att.baseline.item() == pytest.approx(-10.0)  # the first update starts b at the reward
    att.update_baseline(torch.tensor([-20.0]), yes)
    assert att.baseline.item() == pytest.approx(0.9 * -10 + 0.1 * -20)
    state = micro_model().state_dict()
    assert "decoder.attention.baseline" in state and "decoder.attention.baseline_updates" in state


def test_baseline_survives_a_state_dict_round_trip() -> None:
    model = micro_model()
    model.decoder.attention.update_baseline(torch.tensor([-3.5]), torch.tensor([True]))
    other = micro_model(seed=9)
    other.load_state_dict(model.state_dict())
    assert other.decoder.attention.baseline.item() == pytest.approx(-3.5)
    assert other.decoder.attention.baseline_updates.item() == 1


def test_training_moves_the_baseline_and_evaluation_does_not() -> None:
    # What b moves to, and that the advantage uses b from before: tests/test_hard_estimator.py.
    model = micro_model()
    image, caption = example()
    att = model.decoder.attention
    assert att.baseline_updates.item() == 0
    model.loss(image.expand(4, -1, -1, -1), caption.expand(4, -1))
    assert att.baseline_updates.item() == 1 and att.baseline.item() < 0
    model.eval()
    model.loss(image, caption)  # evaluation does not move the baseline
    assert att.baseline_updates.item() == 1


@pytest.mark.parametrize("coin", ["image", "batch"])
def test_expected_alpha_coin(coin: str) -> None:
    model = micro_model(f"model.attention.coin={coin}", "model.attention.expectation_prob=0.5")
    memory = model.decoder.attention.prepare(torch.zeros(2000, 16, 4))
    share = memory.expect.float().mean().item()
    if coin == "image":
        assert 0.45 < share < 0.55
    else:
        assert share in (0.0, 1.0)


def test_expected_rows_use_the_expectation_and_skip_the_score_term() -> None:
    model = micro_model("model.attention.expectation_prob=1.0")
    image, caption = example()
    out = model(image.expand(3, -1, -1, -1), caption.expand(3, -1))
    assert not out.sampled.any()  # every caption's context is the expectation
    assert (out.location_log_probs == 0).all()  # no sampled cell: no REINFORCE term
    assert (out.entropies > 0).all()


@pytest.mark.parametrize("decode", ["expectation", "argmax", "sample"])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_decoding_a_hard_model(decode: str, strategy: str) -> None:
    model = micro_model(f"model.attention.decode={decode}").eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    gen = model.generate(images, strategy=strategy, beam_size=3, max_len=6)
    real = gen.tokens != PAD_ID
    assert ((gen.locations >= 0) & (gen.locations < 16))[real].all()
    assert (gen.locations[~real] == -1).all()
    if decode != "sample":  # expectation and argmax both record the most attended cell
        assert torch.equal(gen.locations[real], gen.alphas.argmax(-1)[real])


def test_expectation_decoding_equals_soft_attention() -> None:
    hard = micro_model(seed=3).eval()
    soft_overrides = [o for o in MICRO if "attention" not in o]
    soft = build_model(compose_config("train", soft_overrides).model, vocab_size=V).eval()
    soft.load_state_dict(hard.state_dict(), strict=False)  # same weights, no baseline buffers
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    a = hard.generate(images, strategy="beam", beam_size=3, max_len=6)
    b = soft.generate(images, strategy="beam", beam_size=3, max_len=6)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.alphas, b.alphas)


def test_hard_attention_overfits_one_batch() -> None:
    model = micro_model(
        "model.attention.expectation_prob=0.5",
        "model.attention.reward_weight=0.1",
        "model.hidden_dim=32",
        "model.embed_dim=16",
    )
    model.encoder.train()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 16, generator=g)
    captions = torch.randint(4, V, (6, 6), generator=g)
    captions[:, 0], captions[:, -1] = START_ID, END_ID
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        losses = model.loss(images, captions)
        opt.zero_grad()
        losses.loss.backward()
        opt.step()
    assert losses.nll.item() < 0.1, losses.nll.item()


# The reward per caption or per word, and what the baseline averages: test_hard_estimator.py.


def test_unknown_reward_is_refused() -> None:
    with pytest.raises(Exception, match=r"model\.attention\.reward must be one of"):
        micro_model("model.attention.reward=bleu")

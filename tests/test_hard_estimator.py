"""The training loss against float64 references written from the paper (Xu et al. 2015).

A nano model sees 8 px images: a 2x2 grid, L = 4 annotation vectors, so that every location
sequence of a 2-3 word caption can be enumerated and expectations over s are exact sums.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from caption.data.vocab import END_ID, PAD_ID, START_ID
from caption.models.attention import CaptionSteps, HardAttention, HardMemory
from caption.models.build import build_model
from caption.models.captioner import Captioner
from tests.helpers.config import EXACT_HARD, NANO_MODEL, compose_config

V = 12
L = 4  # 8 px through two stride-2 layers: a 2x2 grid
TOL = {"rtol": 0.0, "atol": 1e-10}  # float64 throughout


def nano_model(*overrides: str, seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    model = build_model(compose_config("train", [*NANO_MODEL, *overrides]).model, vocab_size=V)
    model = model.double().train()
    model.encoder.eval()  # BatchNorm batch statistics would couple the captions of a batch
    return model


def images(B: int, seed: int = 1) -> Tensor:
    return torch.rand(
        B, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def grads(model: Captioner) -> Tensor:
    """All parameter gradients, flat; a parameter the loss does not reach counts as zeros."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for p in model.parameters()
        ]
    )


def gradient(model: Captioner, objective: Tensor) -> Tensor:
    model.zero_grad()
    objective.backward()
    return grads(model)


def set_baseline(model: Captioner, b: float) -> HardAttention:
    att = model.decoder.attention
    att.baseline.fill_(b)
    att.baseline_updates.fill_(1)  # past the first update, which starts b at the reward
    return att


def path_terms(
    model: Captioner, image: Tensor, caption: Tensor, paths: Tensor
) -> tuple[Tensor, ...]:
    """For every location sequence s (P, T) of one caption without padding, from the
    teacher-forced α and logits: log p(y|s,a), log p(s|a) = Σ_t log α_t[s_t], Σ_t H[α_t] and
    the penalty Σ_i (1 − Σ_t α_ti)², each (P,)."""
    P = len(paths)
    out = model(image.expand(P, -1, -1, -1), caption.expand(P, -1), locations=paths)
    targets = caption[:, 1:].expand(P, -1)
    log_p_y = out.logits.log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1).sum(1)
    alpha = out.alphas  # (P, T, L)
    log_p_s = alpha.gather(2, paths.unsqueeze(-1)).squeeze(-1).log().sum(1)
    entropy = -(alpha * alpha.log()).sum(dim=(1, 2))
    penalty = ((1 - alpha.sum(1)) ** 2).sum(1)
    return log_p_y, log_p_s, entropy, penalty


def all_paths(steps: int) -> Tensor:
    return torch.tensor(list(itertools.product(range(L), repeat=steps)))  # (L^steps, steps)


CAPTION = torch.tensor([[START_ID, 7, 9, END_ID]])  # 3 words: 4^3 = 64 location paths


# The doubly stochastic penalty: λ is the authors' alpha_c.


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_loss_is_the_authors_objective_times_captions_per_word(attention: str) -> None:
    lam = 0.7
    overrides = [f"model.doubly_stochastic={lam}"]
    if attention == "hard":  # forced cells; λ_r = λ_e = 0 leaves NLL and penalty only
        overrides += [*EXACT_HARD, "model.attention.reward_weight=0"]
    model = nano_model(*overrides)
    captions = torch.tensor(
        [
            [START_ID, 5, 6, 7, END_ID],
            [START_ID, 8, END_ID, PAD_ID, PAD_ID],
            [START_ID, 9, 4, END_ID, PAD_ID],
        ]
    )
    locations = (
        torch.tensor([[0, 3, 1, 2], [2, 1, 0, 0], [3, 3, 0, 1]]) if attention == "hard" else None
    )
    x = images(3)
    # Eq. 14 as the authors' code has it: per caption, the summed NLL plus λ Σ_i (1 − Σ_t α_ti)²;
    # averaged over captions.
    out = model(x, captions, locations=locations)
    targets = captions[:, 1:]
    real = targets != PAD_ID
    log_p = out.logits.log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
    nll = -(log_p * real).sum(1)  # (B,)
    penalty = ((1 - out.alphas.sum(1)) ** 2).sum(1)  # (B,), α = 0 after <end>
    authors = (nll + lam * penalty).mean()
    words = real.sum()
    losses = model.loss(x, captions, locations=locations)
    torch.testing.assert_close(losses.loss, authors * len(captions) / words, **TOL)
    torch.testing.assert_close(losses.nll, nll.sum() / words, **TOL)
    torch.testing.assert_close(losses.attention_reg, penalty.mean(), **TOL)  # logged per caption
    # The penalty matters here: without it the two sides would differ.
    assert (lam * penalty.mean() * len(captions) / words) > 1e-2


# The hard-attention estimator against the exact gradient of the lower bound.


@pytest.mark.parametrize(
    "entropy_weight, b",
    [(0.0, 0.0), (0.3, 0.0), (0.0, -1.7), (0.3, -1.7)],
    ids=["plain", "entropy", "baseline", "entropy+baseline"],
)
def test_expected_estimator_is_the_exact_gradient(entropy_weight: float, b: float) -> None:
    """E_s[ĝ(s)] = Σ_s p(s|a) ĝ(s) equals ∂/∂W of −(L_s + λ_e Σ_s p(s|a) H[s]) / n.

    The estimator's entropy term is λ_e ∂H[s̃] with H[s̃] = Σ_t H[α_t] along s̃; it has no
    score-function part, so its expectation is Σ_s p(s|a) ∂H[s] with p(s|a) held constant.
    A constant b leaves the expectation unchanged: Σ_s p(s|a) ∂log p(s|a) = ∂1 = 0.
    """
    model = nano_model(*EXACT_HARD, f"model.attention.entropy_weight={entropy_weight}")
    image = images(1)
    paths = all_paths(CAPTION.shape[1] - 1)
    n = CAPTION.shape[1] - 1  # words
    log_p_y, log_p_s, entropy, _ = path_terms(model, image, CAPTION, paths)
    p_s = log_p_s.exp()
    torch.testing.assert_close(p_s.sum(), torch.tensor(1.0, dtype=torch.float64), **TOL)
    lower_bound = (p_s * log_p_y).sum()  # L_s = Σ_s p(s|a) log p(y|s,a)
    bonus = entropy_weight * (p_s.detach() * entropy).sum()
    exact = gradient(model, -(lower_bound + bonus) / n)
    expected = torch.zeros_like(exact)
    for s, p in zip(paths, p_s.detach(), strict=True):
        set_baseline(model, b)
        expected += p * gradient(model, model.loss(image, CAPTION, locations=s[None]).loss)
    assert exact.abs().max() > 1e-2
    torch.testing.assert_close(expected, exact, **TOL)


def test_one_forced_path_gives_the_estimator_with_the_old_baseline() -> None:
    """ĝ(s̃) for one path, exactly: ∂ of −[log p(y|s̃) + λ_r (R − b) log p(s̃|a) + λ_e H[s̃]
    − λ Σ_i (1 − Σ_t α_ti)²] / n, with R = log p(y|s̃,a) a constant and b the baseline from
    before the call; then b moves to 0.9 b + 0.1 R."""
    lam, reward_weight, entropy_weight, b = 0.5, 0.1, 0.3, -1.7
    model = nano_model(
        *EXACT_HARD,
        f"model.doubly_stochastic={lam}",
        f"model.attention.reward_weight={reward_weight}",
        f"model.attention.entropy_weight={entropy_weight}",
    )
    image, path = images(1), torch.tensor([[2, 0, 3]])
    n = CAPTION.shape[1] - 1
    log_p_y, log_p_s, entropy, penalty = path_terms(model, image, CAPTION, path)
    R = log_p_y.detach()
    objective = (
        log_p_y + reward_weight * (R - b) * log_p_s + entropy_weight * entropy - lam * penalty
    )
    reference = gradient(model, -objective.sum() / n)
    att = set_baseline(model, b)
    losses = model.loss(image, CAPTION, locations=path)
    torch.testing.assert_close(losses.loss, -objective.sum().detach() / n, **TOL)
    torch.testing.assert_close(gradient(model, losses.loss), reference, **TOL)
    torch.testing.assert_close(att.baseline, 0.9 * b + 0.1 * R.sum(), **TOL)


# An outside reward: a sequence-level score (such as SCST's CIDEr-D) instead of log p(y|s̃,a).


def test_an_outside_reward_and_baseline_replace_the_likelihood_and_the_moving_average() -> None:
    reward_weight, entropy_weight, b = 0.4, 0.3, -1.7
    model = nano_model(
        *EXACT_HARD,
        "model.attention.reward=word",  # applies to the log-likelihood only, not to R from outside
        f"model.attention.reward_weight={reward_weight}",
        f"model.attention.entropy_weight={entropy_weight}",
    )
    att = set_baseline(model, b)
    captions, x = CAPTION.expand(2, -1), images(2)
    out = model.decoder.packed(model.encode(x), captions, torch.tensor([[2, 0, 3], [1, 1, 0]]))
    nll = torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="none")
    steps = CaptionSteps(2, out.rows, nll, out.location_log_probs, out.entropies, out.sampled)
    log_p_s = steps.per_caption(out.location_log_probs)  # (2,) log p(s̃|a)
    entropy = steps.per_caption(out.entropies)  # (2,) Σ_t H[α_t]
    reward = torch.tensor([0.8, 0.1], dtype=torch.float64, requires_grad=True)
    outside = torch.tensor([0.5, 0.2], dtype=torch.float64)
    term = att.surrogate(steps, reward=reward, baseline=outside)
    expected = reward_weight * (reward - outside) * log_p_s + entropy_weight * entropy
    torch.testing.assert_close(term, expected.detach(), **TOL)
    term.sum().backward()
    assert reward.grad is None  # R weighs ∂log p(s̃|a); it is not differentiated
    # An outside baseline leaves the moving average alone.
    assert att.baseline.item() == b and att.baseline_updates.item() == 1
    # Without one, the moving average is b and moves towards the outside reward.
    term = att.surrogate(steps, reward=reward)
    expected = reward_weight * (reward - b) * log_p_s + entropy_weight * entropy
    torch.testing.assert_close(term, expected.detach(), **TOL)
    torch.testing.assert_close(att.baseline, 0.9 * b + 0.1 * reward.detach().mean(), **TOL)


# The baseline: a moving average of the sampled captions' rewards.


def rig_coin(monkeypatch: pytest.MonkeyPatch, att: HardAttention, expect: Tensor) -> None:
    """Make the expected-α coin come out as `expect` (B,) (captions must come sorted by length)."""
    prepare = att.prepare
    monkeypatch.setattr(att, "prepare", lambda a: HardMemory(prepare(a).keys, expect))


@pytest.mark.parametrize("reward", ["caption", "word"])
def test_baseline_averages_the_sampled_captions_only(
    monkeypatch: pytest.MonkeyPatch, reward: str
) -> None:
    model = nano_model(*EXACT_HARD, f"model.attention.reward={reward}")
    att = model.decoder.attention
    captions = torch.tensor(
        [
            [START_ID, 5, 6, END_ID],
            [START_ID, 7, 8, END_ID],
            [START_ID, 9, END_ID, PAD_ID],
            [START_ID, 4, END_ID, PAD_ID],
        ]
    )
    locations = torch.tensor([[0, 1, 2], [3, 2, 1], [1, 1, 0], [2, 0, 0]])
    x = images(4)
    words = (captions[:, 1:] != PAD_ID).sum(1)

    def rewards() -> Tensor:  # R of every caption had it sampled its (forced) cells
        out = model(x, captions, locations=locations)  # expectation_prob = 0: all sample
        targets = captions[:, 1:]
        log_p = out.logits.log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
        log_p_y = (log_p * (targets != PAD_ID)).sum(1)
        return (log_p_y if reward == "caption" else log_p_y / words).detach()

    R = rewards()
    sampled = torch.tensor([True, False, False, True])
    b0 = -2.0
    set_baseline(model, b0)
    rig_coin(monkeypatch, att, ~sampled)
    model.loss(x, captions, locations=locations)
    b1 = 0.9 * b0 + 0.1 * R[sampled].mean()  # b_k = 0.9 b_{k-1} + 0.1 R_k
    torch.testing.assert_close(att.baseline, b1, **TOL)
    # A second batch: the average moves on from b1.
    sampled = torch.tensor([False, True, True, True])
    rig_coin(monkeypatch, att, ~sampled)
    model.loss(x, captions, locations=locations)
    torch.testing.assert_close(att.baseline, 0.9 * b1 + 0.1 * R[sampled].mean(), **TOL)
    assert att.baseline_updates.item() == 3
    # No caption sampled: nothing to learn the reward from, b stays.
    rig_coin(monkeypatch, att, torch.ones(4, dtype=torch.bool))
    model.loss(x, captions, locations=locations)
    torch.testing.assert_close(att.baseline, 0.9 * b1 + 0.1 * R[sampled].mean(), **TOL)
    assert att.baseline_updates.item() == 3


def test_first_baseline_update_starts_at_the_sampled_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nano_model(*EXACT_HARD)
    att = model.decoder.attention
    captions = CAPTION.expand(3, -1)
    locations = torch.tensor([[0, 1, 2], [3, 2, 1], [1, 1, 0]])
    x = images(3)
    rows = [path_terms(model, x[i : i + 1], CAPTION, locations[i : i + 1]) for i in range(3)]
    R = torch.cat([log_p_y for log_p_y, *_ in rows]).detach()
    rig_coin(monkeypatch, att, torch.ones(3, dtype=torch.bool))  # all expected: no update
    model.loss(x, captions, locations=locations)
    assert att.baseline_updates.item() == 0 and att.baseline.item() == 0
    rig_coin(monkeypatch, att, torch.tensor([False, True, False]))
    model.loss(x, captions, locations=locations)
    torch.testing.assert_close(att.baseline, R[[0, 2]].mean(), **TOL)
    assert att.baseline_updates.item() == 1


# Data-parallel steps: the ranks' losses sum to one process's loss on the combined batch.


def test_data_parallel_halves_sum_to_the_whole_batch_with_samples() -> None:
    model = nano_model(
        *EXACT_HARD,
        "model.attention.samples=2",
        "model.doubly_stochastic=0.5",
        "model.attention.reward_weight=0.1",
        "model.attention.entropy_weight=0.3",
    )
    att = model.decoder.attention
    captions = torch.tensor(
        [
            [START_ID, 5, 6, END_ID],
            [START_ID, 7, END_ID, PAD_ID],
            [START_ID, 9, 4, END_ID],
            [START_ID, 8, END_ID, PAD_ID],
        ]
    )
    x = images(4)
    g = torch.Generator().manual_seed(3)
    locations = torch.randint(0, L, (8, 3), generator=g)  # one path per sample, image-major
    b0 = -2.0

    def run(rows: slice, totals: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        set_baseline(model, b0)
        samples = slice(rows.start * 2, rows.stop * 2)
        losses = model.loss(x[rows], captions[rows], locations=locations[samples], totals=totals)
        values = torch.stack([losses.loss, losses.nll, losses.attention_reg]).detach()
        return values, gradient(model, losses.loss), att.baseline.clone()

    whole, whole_grad, whole_b = run(slice(0, 4), None)
    # As training/step.py builds it: the step's words and images, each image counted once.
    totals = torch.tensor([float((captions[:, 1:] != PAD_ID).sum()), float(len(captions))])
    one, one_grad, one_b = run(slice(0, 2), totals)
    two, two_grad, two_b = run(slice(2, 4), totals)
    torch.testing.assert_close(one + two, whole, **TOL)
    torch.testing.assert_close(one_grad + two_grad, whole_grad, **TOL)
    # Equal numbers of sampled captions: the ranks' averaged baseline is one process's.
    torch.testing.assert_close((one_b + two_b) / 2, whole_b, **TOL)
    # And totals of this batch alone change nothing.
    own = torch.tensor([float((captions[:, 1:] != PAD_ID).sum()), 4.0])
    torch.testing.assert_close(run(slice(0, 4), own)[0], whole, **TOL)


# Inference.


@pytest.mark.parametrize("decode", ["argmax", "expectation"])
def test_decoded_context(decode: str) -> None:
    model = nano_model("model/attention=hard", f"model.attention.decode={decode}").eval()
    att = model.decoder.attention
    g = torch.Generator().manual_seed(5)
    annotations = torch.randn(3, L, 4, generator=g, dtype=torch.float64)  # (B, L, D)
    query = torch.randn(3, 8, generator=g, dtype=torch.float64)  # (B, H)
    out = att(query, annotations, att.prepare(annotations))
    alpha = out.alpha  # (B, L)
    if decode == "argmax":  # a_{argmax_i α_i}: the one most attended annotation vector
        reference = annotations[torch.arange(3), alpha.argmax(-1)]
    else:  # Σ_i α_i a_i
        reference = (alpha.unsqueeze(-1) * annotations).sum(1)
    assert alpha.max(-1).values.lt(0.99).all()  # the two references differ
    torch.testing.assert_close(out.context, reference, **TOL)
    assert out.sampled.tolist() == [decode == "argmax"] * 3

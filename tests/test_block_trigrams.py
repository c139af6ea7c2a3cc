"""`block_trigrams`: no decoded caption repeats a trigram, in every strategy, and nothing else
changes; the repeated-trigram rate `caption-evaluate` reports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from caption.data.vocab import END_ID
from caption.metrics import repeated_trigram_rate
from caption.metrics.repetition import has_repeated_trigram
from caption.models.decoding import forbidden_words, repeated_trigram_words
from tests.helpers.cli import run
from tests.helpers.models import images, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

A, B = 5, 6  # the words the rigged models prefer
SEARCHES = [("greedy", 1), ("sample", 1), ("beam", 1), ("beam", 3), ("beam", 5)]


def decode(model, strategy: str, beam: int, block: bool, n: int = 4):
    torch.manual_seed(0)
    return model.generate(
        images(n),
        strategy=strategy,
        beam_size=beam,
        max_len=12,
        length_penalty=1.0,  # beam: raw log p would pick the empty caption here
        block_trigrams=block,
    )


def words(tokens: torch.Tensor) -> list[list[int]]:
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(END_ID)] if END_ID in row else [w for w in row if w > 0])
    return out


def biased_model(bias: dict[int, float]) -> torch.nn.Module:
    """A tiny model whose output layer prefers the words of `bias` whatever it sees."""
    model = tiny_model("model.dropout=0").eval()
    with torch.no_grad():
        model.decoder.L_o.weight.mul_(0.0)
        model.decoder.L_o.bias.zero_()
        for word, b in bias.items():
            model.decoder.L_o.bias[word] = b
    return model


@pytest.mark.parametrize(("strategy", "beam"), SEARCHES)
def test_blocking_removes_every_repeated_trigram(strategy: str, beam: int) -> None:
    # One word far likelier than the rest, `<end>` unlikely: unblocked, captions repeat it.
    model = biased_model({A: 6.0, B: 5.0, END_ID: -2.0})
    free = words(decode(model, strategy, beam, block=False).tokens)
    assert repeated_trigram_rate(free) > 0.5, free  # the test can fail
    blocked = words(decode(model, strategy, beam, block=True).tokens)
    assert repeated_trigram_rate(blocked) == 0.0, blocked


@pytest.mark.parametrize(("strategy", "beam"), SEARCHES)
def test_without_repeats_blocking_changes_nothing(strategy: str, beam: int) -> None:
    model = biased_model({END_ID: 3.0})  # captions end within a word or two
    free, blocked = (decode(model, strategy, beam, block=b) for b in (False, True))
    assert repeated_trigram_rate(words(free.tokens)) == 0.0
    assert torch.equal(free.tokens, blocked.tokens)
    torch.testing.assert_close(free.log_probs, blocked.log_probs)


def test_the_mask_equals_a_plain_reference() -> None:
    g = torch.Generator().manual_seed(0)
    history = torch.randint(4, 8, (64, 9), generator=g)  # 4 words: many repeats
    V = 10
    got = repeated_trigram_words(history, torch.zeros(64, V))
    for b, row in enumerate(history.tolist()):
        expected = torch.zeros(V, dtype=torch.bool)
        for c in range(V):  # c is blocked iff (row[-2], row[-1], c) occurred before
            trigram = (row[-2], row[-1], c)
            earlier = {tuple(row[i : i + 3]) for i in range(len(row) - 2)}
            expected[c] = trigram in earlier
        assert torch.equal(got[b], expected), (row, got[b], expected)


@torch.no_grad()
def test_greedy_blocking_equals_a_brute_force_decode() -> None:
    """Greedy with blocking = at each step the argmax over the words the rule allows."""
    model = biased_model({A: 6.0, B: 5.5, 7: 5.0, END_ID: -1.0})
    gen = decode(model, "greedy", 1, block=True, n=2)
    annotations = model.encode(images(2))
    dec = model.decoder
    banned = forbidden_words()
    for b in range(2):
        a = annotations[b : b + 1]
        memory, state = dec.attention.prepare(a), dec.init_state(a)
        y, caption, log_p = torch.tensor([1]), [], 0.0
        for _ in range(12):
            step = dec.step(y, state, a, memory, dec.recurrent_weight())
            logits = step.logits[0].clone()
            logits[banned] = -math.inf
            for c in range(len(logits)):
                if len(caption) >= 2 and has_repeated_trigram([*caption, c]):
                    logits[c] = -math.inf
            word = int(logits.argmax())
            log_p += float(logits.log_softmax(-1)[word])
            caption.append(word)
            state, y = step.state, torch.tensor([word])
            if word == END_ID:
                break
        assert gen.tokens[b, : len(caption)].tolist() == caption
        assert gen.log_probs[b].item() == pytest.approx(log_p, abs=1e-5)


def test_repeated_trigram_rate_on_hand_examples() -> None:
    assert repeated_trigram_rate([]) == 0.0
    assert repeated_trigram_rate([["a", "b", "c", "a", "b"]]) == 0.0  # (a, b) twice, no trigram
    red = ["a", "man", "in", "a", "red", "shirt", "and", "a", "red", "shirt"]
    assert repeated_trigram_rate([red]) == 1.0
    assert repeated_trigram_rate([red, ["a", "dog"], ["a", "a", "a", "a"], ["x"]]) == 0.5


@pytest.mark.slow
@pytest.mark.cli
def test_decoding_commands_take_block_trigrams(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    image = next((trained / "shapes" / "images").glob("test_*.png"))
    out = tmp_path / "c.jsonl"
    run(
        "caption-generate",
        f"checkpoint={ckpt}",
        f"images={image}",
        f"output={out}",
        "block_trigrams=true",
    )
    assert out.read_text().count("\n") == 1
    bad = run(
        "caption-generate",
        f"checkpoint={ckpt}",
        f"images={image}",
        "block_trigrams=maybe",
        check=False,
    )
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert "block_trigrams" in last

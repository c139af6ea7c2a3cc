"""Self-critical sequence training: the sampled policy, the loss against a plain reference,
both baselines, every attention variant, and the fine-tuning run from a checkpoint."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig

from caption.checkpoint import load_checkpoint
from caption.cli.train import train
from caption.data.vocab import END_ID, PAD_ID, Vocabulary
from caption.errors import CaptionError
from caption.metrics import CiderD
from caption.models.decoding import forbidden_words
from caption.training.dist import Dist
from caption.training.scst import ImageBatch, SelfCritical, rollout
from tests.helpers import BIN, ROOT
from tests.helpers.cli import run
from tests.helpers.config import NANO_MODEL, TINY_MODEL, compose_config
from tests.helpers.models import V, images, tiny_model
from tests.helpers.resume import assert_same_run, wait_for_step

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [f"w{i}" for i in range(V - 4)]
VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *WORDS])
# Two images with references over the tiny vocabulary: the reward has something to match.
REFERENCES = [
    [["w0", "w1", "w2"], ["w0", "w1", "w3", "w4"], ["w1", "w2"]],
    [["w5", "w6"], ["w5", "w6", "w7"], ["w8", "w5", "w6"]],
]
VARIANTS = {
    "soft": [],
    "hard": ["model/attention=hard"],
    "local": ["model/attention=local"],
    "multihead_local": ["model.heads=2", "model/attention=local"],
    "scaled_dot": ["model/score=scaled_dot"],
    "input_feeding": ["model.input_feeding=true"],
    "self_attention": ["model.encoder_self_attention.layers=1"],
}


def _objective(**kwargs) -> SelfCritical:
    bank = SimpleNamespace(records=[SimpleNamespace(captions=c) for c in REFERENCES])
    return SelfCritical(bank, VOCAB, **kwargs)


def _batch() -> ImageBatch:
    return ImageBatch(images(2), torch.tensor([0, 1]))


def test_rollout_log_probs_are_the_teacher_forced_log_probs_of_the_sampled_captions() -> None:
    model = tiny_model(*NANO_MODEL[:4]).eval().double()  # no dropout: one policy, two passes
    torch.manual_seed(0)
    annotations = model.encode(images(3).double() / 255)
    out = rollout(model.decoder, annotations, max_len=6, forbidden=forbidden_words())
    B, T = out.tokens.shape
    assert B == 3 and T <= 6
    # Teacher forcing the same captions, `<start>` first, scores each word in float64.
    captions = torch.cat([torch.full((B, 1), 1), out.tokens], dim=1)
    # The policy never draws <pad>, <start> or <unk>: p is renormalised over the other words.
    logits = model.decoder(annotations, captions).logits
    logits[..., forbidden_words()] = -torch.inf
    logits = logits.log_softmax(-1)  # (B, T, V)
    targets = captions[:, 1:]
    real = torch.ones_like(targets, dtype=torch.bool)
    for b in range(B):  # up to and including the first <end>
        ends = (targets[b] == END_ID).nonzero()
        if len(ends):
            real[b, int(ends[0]) + 1 :] = False
    assert torch.equal(targets[~real], torch.full_like(targets[~real], PAD_ID))
    expected = -(logits.gather(2, targets[..., None]).squeeze(2) * real).sum(1)
    torch.testing.assert_close(out.steps.per_caption(out.steps.nll), expected)
    assert len(out.steps.nll) == int(real.sum())


def test_scst_loss_is_the_advantage_weighted_nll_against_a_plain_reference() -> None:
    model = tiny_model(*NANO_MODEL).double().train()  # dropout 0: the greedy pass is the same net
    scst = _objective(samples=3, baseline="greedy", max_len=5)
    torch.manual_seed(1)
    pixels = images(2).double() / 255
    step = scst.losses(
        model, ImageBatch(pixels, torch.tensor([0, 1])), Dist.from_env("cpu"), channels_last=False
    )
    torch.manual_seed(1)  # replay the same draws, then score them straight from the formula
    annotations = model.encode(pixels).repeat_interleave(3, dim=0)
    out = rollout(model.decoder, annotations, max_len=5, forbidden=forbidden_words())
    hyps = [VOCAB.decode(row) for row in out.tokens.tolist()]
    cider = CiderD(REFERENCES)
    r = [float(x) for x in cider.score(hyps, [0, 0, 0, 1, 1, 1])]
    greedy = model.eval().generate(pixels, strategy="greedy", max_len=5)
    b = [float(x) for x in cider.score([VOCAB.decode(r) for r in greedy.tokens.tolist()], [0, 1])]
    nll = out.steps.per_caption(out.steps.nll).tolist()
    words = len(out.steps.nll)
    expected = sum((r[k] - b[k // 3]) * nll[k] for k in range(6)) / words
    assert step.loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert step.words == words
    assert step.values[3].item() == pytest.approx(sum(r) / 6)  # the logged mean reward
    assert step.values[4].item() == pytest.approx(sum(b) / 2)  # and the mean baseline


def test_mean_baseline_is_the_mean_reward_of_the_other_samples() -> None:
    scst = _objective(samples=3, baseline="mean")
    reward = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    b = scst._baseline(None, None, reward, [0, 1])
    assert b.tolist() == [4.0, 3.5, 1.5, 1.5, 1.5, 0.0]
    with pytest.raises(ValueError, match="samples >= 2"):
        _objective(samples=1, baseline="mean")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_every_variant_trains_under_scst(variant: str, baseline: str) -> None:
    model = tiny_model(*VARIANTS[variant]).train()
    scst = _objective(samples=2, baseline=baseline, max_len=6)
    torch.manual_seed(0)
    step = scst.losses(model, _batch(), Dist.from_env("cpu"), channels_last=False)
    assert torch.isfinite(step.loss)
    step.loss.backward()
    decoder = dict(model.decoder.named_parameters())
    # Every decoder parameter a sampled word depends on gets a gradient.
    missing = [n for n, p in decoder.items() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert model.training  # the greedy baseline put the model back in training mode


def test_hard_attention_locations_learn_from_the_reward() -> None:
    model = tiny_model(
        "model/attention=hard",
        "model.attention.expectation_prob=0",
        "model.attention.entropy_weight=0",
        "model.doubly_stochastic=0",
    ).train()
    scst = _objective(samples=2, baseline="mean", max_len=6)
    torch.manual_seed(0)
    step = scst.losses(model, _batch(), Dist.from_env("cpu"), channels_last=False)
    score = model.decoder.attention.score
    grads = torch.autograd.grad(step.loss, list(score.parameters()), allow_unused=True)
    # With hard attention the context is one cell: the score's only gradient is the REINFORCE
    # term λ_r (r − b) ∂log p(s̃), so it is non-zero exactly when the locations learn.
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.decoder.attention.baseline_updates == 0  # an outside baseline: b stays


def _shapes_args(shapes: Path, run_dir: Path) -> list[str]:
    return [
        f"data.annotations={shapes}",
        f"data.images={shapes.parent}",
        f"hydra.run.dir={run_dir}",
        "data.batch_size=16",
        "data.image_size=32",
        "trainer.val_max_images=8",
        "trainer.progress=false",
        "trainer.device=cpu",
        *TINY_MODEL,
    ]


@pytest.mark.slow
@pytest.mark.cli
def test_scst_fine_tunes_a_checkpoint_and_monitors_cider(tiny_shapes: Path, tmp_path: Path) -> None:
    xe, scst = tmp_path / "xe", tmp_path / "scst"
    run("caption-train", *_shapes_args(tiny_shapes, xe), "trainer.max_epochs=1")
    init = xe / "checkpoints" / "best.pt"
    run(
        "caption-train",
        *_shapes_args(tiny_shapes, scst),
        "trainer.objective=scst",
        f"init_from={init}",
        "trainer.monitor=cider",
        "trainer.max_epochs=1",
        "trainer.scst.samples=2",
        "model.hidden_dim=64",  # ignored: the model is the checkpoint's
    )
    row = json.loads((scst / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_reward", "train_baseline", "val_cider", "val_bleu4"} <= row.keys()
    assert row["epoch"] == 1 and row["step"] == 4  # 64 images / 16: one item per image
    summary = json.loads((scst / "summary.json").read_text())
    assert summary["monitor"] == "cider" and summary["best_val"] == row["val_cider"]
    ckpt, before = load_checkpoint(scst / "checkpoints" / "best.pt"), load_checkpoint(init)
    assert ckpt["config"]["model"] == before["config"]["model"]  # the checkpoint's model
    assert ckpt["vocab"] == before["vocab"]
    assert ckpt["config"]["trainer"]["objective"] == "scst"
    changed = [k for k in before["model"] if not torch.equal(before["model"][k], ckpt["model"][k])]
    assert changed  # it trained


def test_scst_needs_a_model_to_start_from(train_cfg: DictConfig) -> None:
    train_cfg.trainer.objective = "scst"
    with pytest.raises(CaptionError, match="add init_from=<checkpoint>") as e:
        train(train_cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("trainer.objective=rl", "trainer.objective must be one of xe, scst"),
        ("trainer.monitor=meteor", "trainer.monitor must be one of bleu4, cider"),
        ("trainer.scst.baseline=zero", "trainer.scst.baseline must be one of greedy, mean"),
        ("trainer.scst.samples=0", "trainer.scst.samples"),
    ],
)
def test_bad_scst_settings_are_named(override: str, match: str, tiny_shapes: Path) -> None:
    cfg = compose_config("train", [f"data.annotations={tiny_shapes}", override, "init_from=x"])
    with pytest.raises(CaptionError, match=match):
        train(cfg)


def test_init_from_a_foreign_file_is_one_line(train_cfg: DictConfig, tmp_path: Path) -> None:
    bad = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    train_cfg.init_from = str(bad)
    with pytest.raises(CaptionError) as e:
        train(train_cfg)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


SCST_STEPS = 8  # 2 epochs of 64 images / batch 16


def _scst_args(shapes: Path, init: Path, run_dir: Path) -> list[str]:
    return [
        *_shapes_args(shapes, run_dir),
        "trainer.objective=scst",
        f"init_from={init}",
        "trainer.max_epochs=2",
        "trainer.scst.samples=3",
        "trainer.deterministic=true",
        "trainer.checkpoint_every=1",
        # Hard attention draws coins and locations, dropout its masks, sampling the words: a
        # resume that missed any RNG state would diverge.
        "model/attention=hard",
    ]


@pytest.mark.slow
@pytest.mark.cli
def test_scst_sigkill_then_resume_ends_bitwise_equal(tiny_shapes: Path, tmp_path: Path) -> None:
    # The checkpoint's own model is hard-attention: init_from brings its config along.
    xe = tmp_path / "xe-hard"
    run(
        "caption-train",
        *_shapes_args(tiny_shapes, xe),
        "trainer.max_epochs=1",
        "model/attention=hard",
    )
    init = xe / "checkpoints" / "best.pt"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run("caption-train", *_scst_args(tiny_shapes, init, whole))
    step = random.Random().randint(2, SCST_STEPS - 3)
    proc = subprocess.Popen(
        [str(BIN / "caption-train"), *_scst_args(tiny_shapes, init, killed)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_step(proc, killed, step)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["progress"]["step"] < SCST_STEPS
    run("caption-train", *_scst_args(tiny_shapes, init, killed), "resume=auto")
    keys = ("epoch", "step", "train_loss", "train_reward", "train_baseline", "val_cider")
    assert_same_run(whole, killed, SCST_STEPS, keys)

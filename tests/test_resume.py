"""Exact resume after SIGKILL and SIGTERM, `resume=`, and checkpoints that must not load."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from caption.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from caption.cli.train import train
from caption.errors import CaptionError
from caption.training.resume import capture_rng, restore_rng, resume_path, sync_metrics
from tests.helpers import BIN, ROOT
from tests.helpers.cli import run
from tests.helpers.config import TINY_MODEL
from tests.helpers.resume import assert_same_run, wait_for_step

STEPS = 24  # 2 epochs of 12 steps: 64 images x 6 captions / batch 32


def _args(shapes: Path, run_dir: Path) -> list[str]:
    return [
        f"data.annotations={shapes}",
        f"data.images={shapes.parent}",
        f"hydra.run.dir={run_dir}",
        "data.batch_size=32",
        "data.image_size=32",  # a 4x4 grid: the test is about state, not accuracy
        "trainer.max_epochs=2",
        "trainer.val_max_images=4",
        "trainer.progress=false",
        "trainer.device=cpu",
        "trainer.deterministic=true",
        "trainer.checkpoint_every=1",
        # Hard attention draws locations and coins, dropout draws masks, and the baseline
        # buffer moves: a resume that missed any RNG state or buffer would diverge.
        "model/attention=hard",
        *TINY_MODEL,
    ]


def _assert_same_run(a: Path, b: Path) -> None:
    assert_same_run(a, b, STEPS, ("epoch", "step", "train_loss", "train_nll", "val_bleu4"))


def _start(shapes: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "caption-train"), *_args(shapes, run_dir), *extra],
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def uninterrupted(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "whole"
    run("caption-train", *_args(tiny_shapes, run_dir))
    return run_dir


@pytest.mark.slow
@pytest.mark.cli
def test_sigkill_at_a_random_step_then_resume_ends_bitwise_equal(
    tiny_shapes: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "killed"
    step = random.Random().randint(2, STEPS - 6)
    proc = _start(tiny_shapes, run_dir)
    try:
        wait_for_step(proc, run_dir, step)
        proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was being written, is cut
    finally:
        proc.kill()
    assert proc.wait() == -signal.SIGKILL
    killed_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["step"]
    assert step <= killed_at < STEPS, f"killed at step {killed_at}, asked for {step}"
    run("caption-train", *_args(tiny_shapes, run_dir), f"resume={run_dir}")
    _assert_same_run(uninterrupted, run_dir)


@pytest.mark.slow
@pytest.mark.cli
def test_sigterm_saves_before_exiting_and_resume_continues_exactly(
    tiny_shapes: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    # Periodic checkpoints far apart: the one resumed from is the one SIGTERM wrote.
    proc = _start(tiny_shapes, first, "trainer.checkpoint_every=1000")
    try:
        deadline = time.monotonic() + 240
        log = first / "train.log"
        # The handlers are in place once training starts; the signal lands in epoch 1.
        while "training from epoch 1" not in (log.read_text() if log.is_file() else ""):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    log = (first / "train.log").read_text()
    assert "SIGTERM received" in log and "resume=" in log
    ckpt = load_checkpoint(first / "checkpoints" / "last.pt")
    stopped = ckpt["progress"]["step"]
    assert 0 < stopped < STEPS // 2 and ckpt["progress"]["position"] == stopped * 32
    # Resume from the checkpoint file into another run dir: its metrics come along.
    run("caption-train", *_args(tiny_shapes, second), f"resume={first}/checkpoints/last.pt")
    _assert_same_run(uninterrupted, second)


def test_resume_needs_a_checkpoint(train_cfg: DictConfig, tmp_path: Path) -> None:
    train_cfg.resume = str(tmp_path / "nothing-here")
    with pytest.raises(CaptionError, match="neither a checkpoint nor a run dir") as e:
        train(train_cfg)
    assert "\n" not in str(e.value)


def test_resume_auto_continues_the_run_dirs_own_last_checkpoint_if_any(tmp_path: Path) -> None:
    assert resume_path("auto", tmp_path) is None  # a new run dir: start afresh
    assert resume_path(None, tmp_path) is None
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resume_path("auto", tmp_path) == last
    assert resume_path(str(tmp_path), tmp_path / "elsewhere") == last  # resume=<run dir>


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path: Path) -> None:
    import random as pyrandom

    import numpy as np

    state = capture_rng()
    save_checkpoint(tmp_path / "rng.pt", rng=state)
    expected = (pyrandom.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(load_checkpoint(tmp_path / "rng.pt")["rng"])  # weights_only=True inside
    assert (pyrandom.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_metrics_follow_the_checkpoint(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "a": 1}\n{"epoch": 2, "a": 2}\n{"epoch": 3, "a"')
    sync_metrics(metrics, 1, None)  # rows after the checkpoint go; a torn line goes
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1]
    sync_metrics(metrics, 2, {"epoch": 2, "a": 5})  # the checkpoint's row, lost in a kill
    assert [json.loads(x)["a"] for x in metrics.read_text().splitlines()] == [1, 5]


class _Payload:
    """Unpickling this creates `marker`: what a hostile checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_with_pickled_code_is_refused_and_the_code_never_runs(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "model": _Payload(marker)}, evil)
    with pytest.raises(CaptionError, match="cannot be read safely") as e:
        load_checkpoint(evil)
    assert "\n" not in str(e.value) and str(evil) in str(e.value)
    assert not marker.exists()
    # The payload is real: an unsafe load runs it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.cli
def test_generate_refuses_a_hostile_checkpoint(tmp_path: Path, tiny_shapes: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:  # a bare pickle, as a hand-made attack file would be
        pickle.dump({"format": FORMAT, "version": VERSION, "x": _Payload(marker)}, f)
    image = next((tiny_shapes.parent / "images").iterdir())
    proc = run("caption-generate", f"checkpoint={evil}", f"images={image}", check=False)
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.strip().count("\n") == 0 and "cannot be read safely" in proc.stderr


@pytest.mark.parametrize("version", [VERSION + 1, "2", None, 0])
def test_checkpoint_format_version_is_checked(tmp_path: Path, version: object) -> None:
    path = tmp_path / "v.pt"
    torch.save({"format": FORMAT, "version": version, "model": {}}, path)
    with pytest.raises(CaptionError, match="format version") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)

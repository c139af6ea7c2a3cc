"""Interrupting a training run and checking that the resumed one is the same run."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import torch


def final_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def assert_same_run(a: Path, b: Path, steps: int, keys: tuple[str, ...]) -> None:
    """Both runs ended at `steps` with bitwise equal weights and optimizer state, and the
    same `keys` in every `metrics.jsonl` row."""
    x, y = final_checkpoint(a), final_checkpoint(b)
    assert x["progress"]["step"] == y["progress"]["step"] == steps
    assert x["model"].keys() == y["model"].keys()
    for name, tensor in x["model"].items():
        assert torch.equal(tensor, y["model"][name]), f"{name} differs"  # bitwise
    for s, t in zip(
        x["optimizer"]["state"].values(), y["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(s[k], t[k]) for k in s)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").open()] for d in (a, b)]
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> int:
    """Poll the run's log until a checkpoint at `step` or later was saved; return that step."""
    log = run_dir / "train.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saved = re.findall(r"at step (\d+) \(epoch", log.read_text() if log.is_file() else "")
        if saved and int(saved[-1]) >= step:
            return int(saved[-1])
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")

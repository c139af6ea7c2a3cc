"""What exact resume needs beyond the weights: RNG states, the checkpoint to resume, signals.

A run that is resumed from a checkpoint continues the uninterrupted run's computation: the
same data order (rebuilt from the seed, see `caption.data.sampler`), the same position in the
epoch, and the same random numbers, because every generator's state is saved with the
weights. Everything here is stored as tensors and primitives, so checkpoints still load with
`weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from caption.errors import CaptionError
from caption.files import atomic_file

log = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU and CUDA) generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        # An ndarray would need an unsafe unpickler; an int64 tensor holds the uint32 keys.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back into a state `capture_rng` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        else:
            log.warning("resume: CUDA generators not restored (another number of GPUs)")


def resume_path(spec: str | bool | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start afresh.

    Args:
        spec: `resume=`: a checkpoint file, or a run dir (its `checkpoints/last.pt`), or a
            `checkpoints/` folder. `trainer.resume=true` passes `True`: the run dir's own
            `last.pt` when there is one (so a restarted job continues and a new one starts).
        run_dir: this run's directory.

    Raises:
        CaptionError: `resume=` names no checkpoint.
    """
    if spec is True:
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    if not spec:
        return None
    path = Path(str(spec))
    for candidate in (path, path / "checkpoints" / "last.pt", path / "last.pt"):
        if candidate.is_file():
            return candidate
    raise CaptionError(
        f"resume: {path} is neither a checkpoint nor a run dir with checkpoints/last.pt; "
        "pass resume=<run dir> or resume=<run dir>/checkpoints/<file>.pt"
    )


def sync_metrics(metrics_file: Path, epoch: int, row: dict[str, Any] | None) -> None:
    """Make `metrics.jsonl` agree with a checkpoint that has finished `epoch` epochs.

    Rows of later epochs (written after the checkpoint by the interrupted run) are dropped, and
    the checkpoint's own epoch row is added when the run died between saving it and writing it,
    so the file holds one row per finished epoch, as an uninterrupted run's does.
    """
    rows = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
    rows = [r for r in rows if r.get("epoch", 0) <= epoch]
    if row is not None and row.get("epoch") == epoch and not any(r["epoch"] == epoch for r in rows):
        rows.append(row)
    with atomic_file(metrics_file) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


class StopSignals:
    """Turn SIGTERM and SIGINT into a flag that the training loop checks after each step.

    The loop then saves a checkpoint and exits, instead of dying mid-step. A second signal of
    the same kind while saving is ignored (the save is short, and atomic anyway). Handlers are
    installed only in the main thread (Python allows no other) and restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            log.warning(
                "%s received: saving a checkpoint after this step", signal.Signals(signum).name
            )
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

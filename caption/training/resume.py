"""Everything exact resume needs: which checkpoint, its training state, RNG, metrics, signals.

A run that is resumed from a checkpoint continues the uninterrupted run's computation: the
same data order (rebuilt from the seed, see `caption.data.sampler`), the same position in the
epoch, and the same random numbers, because every generator's state is saved with the
weights. Everything here is stored as tensors and primitives, so checkpoints still load with
`weights_only=True`.

`resume=` picks the checkpoint (`resume_path`); `restore` loads it into a run; `StopSignals`
turns SIGTERM and Ctrl-C into a save; `Intact` names the checkpoint to continue from when a
later write fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from caption.checkpoint import load_checkpoint
from caption.data.vocab import Vocabulary
from caption.errors import CaptionError, first_line
from caption.files import advised, atomic_file
from caption.training.dist import Dist
from caption.training.objectives import XE_TERMS

log = logging.getLogger(__name__)


def resume_path(spec: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start afresh.

    Args:
        spec: `resume=`: `auto` for the run dir's own `checkpoints/last.pt` when there is one
            (so a restarted job continues and a new one starts), or a checkpoint file, a run
            dir (its `checkpoints/last.pt`), or a `checkpoints/` folder; None starts afresh.
        run_dir: this run's directory.

    Raises:
        CaptionError: `resume=` names no checkpoint.
    """
    if spec == "auto":
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
        "pass resume=<run dir>, resume=<run dir>/checkpoints/<file>.pt or resume=auto"
    )


# --------------------------------------------------------------------------- progress


def fresh_progress(terms: tuple[str, ...] = XE_TERMS) -> dict[str, Any]:
    """Where a run stands: finished epochs and steps, the position inside the next epoch and
    its running sums of the objective's `terms`, and early stopping's state (`best` is the
    monitored val score of `best_epoch`, `best_bleu4` that epoch's val BLEU-4)."""
    return {
        "epoch": 0,
        "step": 0,
        "position": 0,  # samples of epoch `epoch + 1` already trained on (all ranks together)
        "partial": fresh_partial(terms),
        "best": -1.0,
        "best_bleu4": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
    }


def fresh_partial(terms: tuple[str, ...] = XE_TERMS) -> dict[str, Any]:
    """The running sums of an epoch not yet begun."""
    return {
        "sums": dict.fromkeys(terms, 0.0),
        "batches": 0,
        "images": 0,
        "words": 0,
        "seconds": 0.0,
        "skipped": 0,
    }


# ------------------------------------------------------------------------------ restore


def restore(
    path: Path,
    dist: Dist,
    run_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    vocab: Vocabulary,
    batch_size: int,
) -> dict[str, Any]:
    """Load the checkpoint at `path` into the run (every rank calls it); return its progress.

    Rank 0 reads the file (safely) and hands it on: other machines need no copy of it. The
    run dir's `metrics.jsonl` is made to agree with the checkpoint. The RNG states are
    restored last, so call this after everything in the run's setup that draws random numbers.

    Raises:
        CaptionError: the checkpoint has another vocabulary, model or optimizer.
    """
    ckpt = load_checkpoint(path, map_location="cpu") if dist.is_main else None
    ckpt = dist.broadcast_object(ckpt)
    if ckpt["vocab"] != vocab.itos:
        raise CaptionError(
            f"resume: {path} was trained with another vocabulary; resume with the same "
            "data, or start a new run dir"
        )
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CaptionError(
            f"resume: {path} does not fit this config's model or optimizer "
            f"({first_line(e, 160)}); resume with the config it was trained with"
        ) from None
    scheduler.load_state_dict(ckpt["scheduler"])
    progress = _progress(ckpt, path, dist, batch_size)
    if dist.is_main:
        _copy_metrics(path, run_dir)
        sync_metrics(run_dir / "metrics.jsonl", progress["epoch"], ckpt.get("metrics"))
    _restore_rank_rng(ckpt, dist)  # last: everything above may draw random numbers
    return progress


def _progress(ckpt: dict[str, Any], path: Path, dist: Dist, batch_size: int) -> dict[str, Any]:
    """The checkpoint's progress, completed with what an older version lacks, and logged."""
    progress = {**fresh_progress(), **ckpt["progress"]}
    if "best" not in ckpt["progress"]:  # older versions monitored val BLEU-4 alone
        progress["best"] = progress["best_bleu4"]
    # A checkpoint of an older version lacks newer running sums (the words, for one).
    progress["partial"] = {**fresh_partial(), **progress["partial"]}
    was = (progress.get("world_size", 1), progress.get("batch_size", batch_size))
    if was != (dist.world_size, batch_size):
        log.warning(
            "resume: the checkpoint ran %d process(es) x batch %d, this run %d x %d: it continues "
            "from the same sample, but not as the same computation",
            *was,
            dist.world_size,
            batch_size,
        )
    log.info(
        "resumed from %s at epoch %d, step %d (sample %d of epoch %d)",
        path,
        progress["epoch"],
        progress["step"],
        progress["position"],
        progress["epoch"] + 1,
    )
    return progress


def _copy_metrics(ckpt_path: Path, run_dir: Path) -> None:
    """Resuming another run into a new run dir: start from that run's metrics."""
    source = ckpt_path.parent.parent / "metrics.jsonl"
    target = run_dir / "metrics.jsonl"
    fresh = ckpt_path.parent.name == "checkpoints" and not target.exists()
    if fresh and source.is_file() and source.resolve() != target.resolve():
        with atomic_file(target) as f:
            f.write(source.read_text())


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


# ---------------------------------------------------------------------------------- RNG


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


def _restore_rank_rng(ckpt: dict[str, Any], dist: Dist) -> None:
    """This rank's generator states from the checkpoint (one entry per rank)."""
    rng = ckpt.get("rng")
    if isinstance(rng, torch.Tensor):  # format version 1: torch's CPU generator only
        torch.set_rng_state(rng)
        log.warning("resume: a version 1 checkpoint holds torch's RNG only; not an exact resume")
    elif isinstance(rng, list) and rng:
        restore_rng(rng[dist.rank] if len(rng) == dist.world_size else rng[0])


# ----------------------------------------------------------------- stopping and failing


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


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which saves and then
    shuts them down; a worker killed by Ctrl-C would break the batch being saved after."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def interrupted(name: str | None, step: int, run_dir: Path) -> dict[str, Any]:
    """The summary of a run stopped by a signal after saving its state."""
    log.warning(
        "%s: stopped at step %d after saving; continue with caption-train resume=%s",
        name,
        step,
        run_dir,
    )
    return {"run_dir": str(run_dir), "steps": step, "interrupted": name}


@dataclass(frozen=True)
class Intact:
    """The checkpoint that a resume continues from while later writes fail.

    Attributes:
        path: the file (`<run dir>/checkpoints/last.pt`, or the one this run resumed from);
            None until the run has saved one.
        step: the optimizer step it holds.
        resume: what to pass as `resume=` to continue from it.
    """

    path: Path | None = None
    step: int = 0
    resume: Path | None = None

    @classmethod
    def resumed(cls, ckpt_path: Path | None, run_dir: Path, step: int) -> Intact:
        """Before the first save: the checkpoint this run resumed from, if any."""
        if ckpt_path is None:
            return cls()
        own = ckpt_path.resolve() == (run_dir / "checkpoints" / "last.pt").resolve()
        return cls(ckpt_path, step, run_dir if own else ckpt_path)

    def hint(self) -> str:
        """How to continue after a failed write."""
        if self.path is None:
            return "no checkpoint of this run was written yet: once there is room, run it again"
        return (
            f"{self.path}, from step {self.step}, is intact: once there is room, continue "
            f"with caption-train resume={self.resume}"
        )

    def reported(self) -> contextlib.AbstractContextManager:
        """A `WriteError` in the block, told how to continue from this checkpoint."""
        return advised(lambda _: self.hint())

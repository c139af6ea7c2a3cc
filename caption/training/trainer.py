"""The training loop: teacher-forced steps, validation by real decoding, early stopping.

`Trainer` runs in phases: setup (its constructor: loader, optimizer, schedule), then `fit`,
which restores a checkpoint if asked and runs epochs of `train_epoch`, `validate` and
`end_epoch` until `trainer.max_epochs`, `trainer.max_steps`, early stopping or a signal.
`save` writes `last.pt` and `best.pt`; each epoch's row goes to `metrics.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from caption.checkpoint import save_checkpoint
from caption.data.dataset import strict_stop
from caption.data.vocab import Vocabulary
from caption.evaluation.decode import score_bank
from caption.files import atomic_file
from caption.models.captioner import Captioner
from caption.speed import Precision, compile_model
from caption.training.data import Bank, build_loader
from caption.training.dist import Dist
from caption.training.resume import (
    Intact,
    StopSignals,
    capture_rng,
    fresh_partial,
    fresh_progress,
    interrupted,
    restore,
)
from caption.training.step import build_objective, build_optimizer, train_step

log = logging.getLogger(__name__)

# How an epoch's batches ended: all read, `trainer.max_steps` reached, or a stop signal.
EpochEnd = Literal["epoch", "max_steps", "signal"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """Make every op deterministic in the block (or not), then restore torch's setting.

    On the CPU training is deterministic already; this pins down the CUDA kernels that are not
    (atomics in index/scatter backward, cuBLAS workspaces, cuDNN autotuning).
    """
    was = torch.are_deterministic_algorithms_enabled()
    _set_deterministic(on)
    try:
        yield
    finally:
        _set_deterministic(was)


def _set_deterministic(on: bool) -> None:
    if on:
        # cuBLAS reads this when its handle is made, so it must be set before the first matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False


class Trainer:
    """One training run of a built model on its banks; every rank of a `torchrun` job runs one.

    Rank 0 validates and writes checkpoints, metrics and the summary; the others take part in
    the collectives (`Dist`) and in gathering the RNG states that checkpoints hold.

    Args:
        cfg: the composed `train` config.
        dist: this process's place in the job.
        run_dir: where `checkpoints/`, `metrics.jsonl` and `summary.json` go.
        model: the captioner, on `dist.device`, the same on every rank.
        vocab: the train captions' vocabulary.
        train_bank: the train images (or their cached features).
        val_bank: the val images to decode each epoch (empty on ranks other than 0).
        precision: the autocast and loss-scaling setting.
        overrides: the command line's overrides, for the summary.
    """

    def __init__(
        self,
        cfg: DictConfig,
        dist: Dist,
        *,
        run_dir: Path,
        model: Captioner,
        vocab: Vocabulary,
        train_bank: Bank,
        val_bank: Bank,
        precision: Precision,
        overrides: list[str],
    ) -> None:
        self.cfg, self.t, self.dist, self.run_dir = cfg, cfg.trainer, dist, run_dir
        self.model, self.vocab, self.val_bank = model, vocab, val_bank
        self.precision, self.overrides = precision, overrides
        self.ckpt_dir, self.metrics_file = run_dir / "checkpoints", run_dir / "metrics.jsonl"
        self.objective = build_objective(cfg, train_bank, vocab)
        self.train_set = self.objective.dataset(train_bank, vocab, cfg.data.max_caption_len)
        log.info(
            "data: %d train images (%d captions), %d val images, vocabulary %d words; "
            "objective %s, %d items per epoch",
            len(train_bank),
            sum(len(r.captions) for r in train_bank.records),
            len(val_bank),
            len(vocab),
            self.t.objective,
            len(self.train_set),
        )
        self.sampler, self.loader = build_loader(
            self.train_set, cfg.data, self.t.seed, dist, self.objective.collate
        )
        self.step_samples = cfg.data.batch_size * dist.world_size  # one step, all ranks
        self.optimizer, self.params = build_optimizer(cfg, model)
        total_steps = self.t.max_epochs * len(self.loader)
        if self.t.max_steps:
            total_steps = min(total_steps, self.t.max_steps)
        self.scheduler = instantiate(cfg.scheduler)(self.optimizer, total_steps=total_steps)
        self.n_params = sum(p.numel() for p in self.params)
        log.info(
            "model: %s trainable parameters, device %s, %d process(es)",
            f"{self.n_params:,}",
            dist.device,
            dist.world_size,
        )
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.progress = fresh_progress(self.objective.terms)
        self.intact = Intact()
        self.train_seconds, self.train_images, self.train_words = 0.0, 0, 0
        if dist.enabled:  # the same init everywhere, but each rank its own dropout masks
            torch.manual_seed(self.t.seed + dist.rank)

    def fit(self, ckpt_path: Path | None = None) -> dict[str, Any]:
        """Train from scratch, or from the checkpoint at `ckpt_path`; return the summary."""
        t, progress = self.t, self.progress
        if ckpt_path is not None:
            progress = self.progress = restore(
                ckpt_path,
                self.dist,
                self.run_dir,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                vocab=self.vocab,
                batch_size=self.cfg.data.batch_size,
            )
        progress.update(world_size=self.dist.world_size, batch_size=self.cfg.data.batch_size)
        # The checkpoint a resume would continue from, named if a later write fails.
        self.intact = Intact.resumed(ckpt_path, self.run_dir, progress["step"])
        if t.compile:  # after loading weights: compiling wraps methods, not the state dict
            compile_model(self.model)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stop = progress["step"] >= (t.max_steps or math.inf)
        with StopSignals() as signals:
            log.info(
                "training from epoch %d, step %d (SIGTERM or Ctrl-C saves last.pt, then stops)",
                progress["epoch"] + 1,
                progress["step"],
            )
            while progress["epoch"] < t.max_epochs and not stop:
                epoch = progress["epoch"] + 1
                ended = self.train_epoch(epoch, signals)
                if ended == "signal":
                    return interrupted(signals.name, progress["step"], self.run_dir)
                row = self.epoch_row(epoch)
                stop = self.end_epoch(epoch, row, self.validate()) or ended == "max_steps"
        return self.finish()

    def train_epoch(self, epoch: int, signals: StopSignals) -> EpochEnd:
        """Train on epoch `epoch` from `progress["position"]`, saving `last.pt` when it is due
        (`trainer.checkpoint_every`) or a signal came; say how the epoch's batches ended."""
        t, progress, model = self.t, self.progress, self.model
        if model.encoder.set_epoch(epoch):
            log.info(
                "encoder: training its top %d blocks from epoch %d",
                model.encoder.trainable_top,
                epoch,
            )
        model.train()
        part = progress["partial"]
        self.sampler.set_epoch(epoch, progress["position"])
        start = time.perf_counter()
        bar = tqdm(
            self.loader,
            desc=f"epoch {epoch}",
            disable=not t.progress or not self.dist.is_main,
            leave=False,
            mininterval=1.0,
            unit="batch",
        )
        ended: EpochEnd = "epoch"
        for batch in bar:
            part["skipped"] += report_skipped(batch.skipped, self.cfg.data.strict_images)
            losses, words = train_step(
                batch,
                self.objective,
                model,
                self.optimizer,
                self.scheduler,
                self.params,
                self.dist,
                t,
                self.precision,
            )
            self._count(batch, losses, words)
            speed = part["images"] / (part["seconds"] + time.perf_counter() - start)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", img_s=f"{speed:.0f}", refresh=False)
            if t.max_steps and progress["step"] >= t.max_steps:
                ended = "max_steps"
                break
            stopping = self.dist.any_rank(signals.received is not None)
            if stopping or (t.checkpoint_every and progress["step"] % t.checkpoint_every == 0):
                part["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                self.save("last.pt")
                log.info(
                    "saved %s at step %d (epoch %d, sample %d of %d)",
                    self.ckpt_dir / "last.pt",
                    progress["step"],
                    epoch,
                    progress["position"],
                    len(self.train_set),
                )
            if stopping:
                return "signal"
        part["seconds"] += time.perf_counter() - start
        return ended

    def _count(self, batch: Any, losses: dict[str, float], words: int) -> None:
        """Add a step to the epoch's running sums and move the run's position on."""
        progress = self.progress
        part = progress["partial"]
        for k in part["sums"]:
            part["sums"][k] += losses[k]
        part["batches"] += 1
        part["images"] += len(batch.images)
        part["words"] += words  # <end> included
        progress["step"] += 1
        progress["position"] = min(len(self.train_set), progress["position"] + self.step_samples)

    def epoch_row(self, epoch: int) -> dict[str, Any]:
        """The finished epoch's `metrics.jsonl` row, before validation: its losses and speed."""
        part = self.progress["partial"]
        self.train_seconds += part["seconds"]
        self.train_images += part["images"]
        self.train_words += part["words"]
        skipped = self.dist.all_reduce_sum(torch.tensor([float(part["skipped"])]))
        part["skipped"] = int(skipped.item())  # every rank's, for the log and metrics
        if part["skipped"]:
            log.warning("epoch %d: skipped %d unreadable image(s)", epoch, part["skipped"])
        return {
            "epoch": epoch,
            "step": self.progress["step"],
            **{f"train_{k}": v / max(part["batches"], 1) for k, v in part["sums"].items()},
            "images_per_sec": part["images"] / max(part["seconds"], 1e-9),
            "words_per_sec": part["words"] / max(part["seconds"], 1e-9),
            "epoch_seconds": part["seconds"],
            **({"skipped_images": part["skipped"]} if part["skipped"] else {}),
        }

    def validate(self) -> dict[str, float] | None:
        """Rank 0 decodes the val images for real and scores them; every rank gets the scores
        (None without val images)."""
        val = None
        if self.dist.is_main and len(self.val_bank):
            val, _ = score_bank(
                self.model, self.val_bank, self.vocab, device=self.dist.device, **self.t.val
            )
        return self.dist.broadcast_object(val)

    def end_epoch(self, epoch: int, row: dict[str, Any], val: dict[str, float] | None) -> bool:
        """Record the epoch: early stopping's state, `best.pt` and `last.pt`, the metrics row.

        Returns:
            Whether early stopping ends the run.
        """
        progress = self.progress
        if val is not None:
            row.update({f"val_{k}": v for k, v in val.items()})
            improved = val[self.t.monitor] > progress["best"]
        else:  # no val split: the latest model is the best we know
            improved = True
        progress.update(epoch=epoch, position=0, partial=fresh_partial(self.objective.terms))
        if improved:
            progress.update(
                best=row.get(f"val_{self.t.monitor}", -1.0),
                best_bleu4=row.get("val_bleu4", -1.0),
                best_epoch=epoch,
                bad_epochs=0,
            )
        else:
            progress["bad_epochs"] += 1
        log.info(
            "epoch %d step %d: loss %.4f, val BLEU-4 %s, CIDEr-D %s, %.0f images/s%s",
            epoch,
            progress["step"],
            row["train_loss"],
            f"{row['val_bleu4']:.4f}" if "val_bleu4" in row else "n/a",
            f"{row['val_cider']:.4f}" if "val_cider" in row else "n/a",
            row["images_per_sec"],
            " (best)" if improved else "",
        )
        # best before last, and both before the metrics row: a kill between any two leaves
        # a last.pt to resume from that redoes (or, via sync_metrics, records) the rest.
        if improved:
            self.save("best.pt", row)
        self.save("last.pt", row)
        if self.dist.is_main:
            with self.intact.reported():
                append_row(self.metrics_file, row)
        if self.t.patience and progress["bad_epochs"] >= self.t.patience:
            log.info("early stopping: no val %s gain in %d epochs", self.t.monitor, self.t.patience)
            return True
        return False

    def save(self, name: str, row: dict[str, Any] | None = None) -> None:
        """Write a checkpoint of the run as it stands (every rank calls it: RNG is gathered)."""
        rng = self.dist.gather_objects(capture_rng())
        if not self.dist.is_main:
            return
        with self.intact.reported():
            save_checkpoint(
                self.ckpt_dir / name,
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                config=self.config,
                vocab=self.vocab.itos,
                progress=self.progress,
                rng=rng,
                metrics=row,
            )
        if name == "last.pt":
            self.intact = Intact(self.ckpt_dir / name, self.progress["step"], self.run_dir)

    def finish(self) -> dict[str, Any]:
        """The run's summary, also written to `summary.json`."""
        progress, seconds = self.progress, self.train_seconds
        summary = {
            "run_dir": str(self.run_dir),
            "epochs": progress["epoch"],
            "steps": progress["step"],
            "best_epoch": progress["best_epoch"],
            "best_val_bleu4": progress["best_bleu4"],
            "monitor": self.t.monitor,
            "best_val": progress["best"],
            "train_seconds": seconds,
            "images_per_sec": self.train_images / seconds if seconds else 0.0,
            "words_per_sec": self.train_words / seconds if seconds else 0.0,
            "parameters": self.n_params,
            "processes": self.dist.world_size,
            "overrides": self.overrides,
        }
        if self.dist.is_main:
            with self.intact.reported(), atomic_file(self.run_dir / "summary.json") as f:
                f.write(json.dumps(summary, indent=2) + "\n")
        log.info("done: %s", json.dumps(summary))
        return summary


def report_skipped(skipped: tuple[str, ...], strict: bool) -> int:
    """Warn about each unreadable image of a batch, or stop on the first in strict mode."""
    if skipped and strict:
        raise strict_stop(skipped[0])
    for reason in skipped:
        log.warning("%s; skipped", reason)
    return len(skipped)


def append_row(metrics_file: Path, row: dict[str, Any]) -> None:
    """Add one epoch's row to `metrics.jsonl`, atomically: a disk that fills up mid-write
    leaves the rows before it, never a cut line (the file is one short row per epoch)."""
    before = metrics_file.read_text() if metrics_file.is_file() else ""
    if before and not before.endswith("\n"):  # a line cut short by an older version
        before = before[: before.rfind("\n") + 1]
    with atomic_file(metrics_file) as f:
        f.write(before + json.dumps(row) + "\n")

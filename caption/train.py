"""`caption-train`: teacher-forced training, validation by real decoding, early stopping.

`train(cfg)` does the work and is what tests call; `main` is the Hydra wrapper.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from caption.checkpoint import load_checkpoint, save_checkpoint
from caption.config import check_train_config
from caption.data.dataset import (
    CaptionBatch,
    CaptionDataset,
    ImageBank,
    collate_captions,
    strict_stop,
)
from caption.data.features import FeatureBank
from caption.data.formats import absolute_spec, check_images, read_dataset
from caption.data.sampler import EpochSampler
from caption.data.vocab import PAD_ID, Vocabulary
from caption.distributed import (
    Dist,
    all_reduce_gradients,
    all_reduce_sum,
    any_rank,
    average_buffers,
    barrier,
    broadcast_module,
    broadcast_object,
    gather_objects,
    init_distributed,
    shutdown,
)
from caption.errors import CaptionError, first_line
from caption.files import advised, atomic_file
from caption.inference import score_bank
from caption.models.build import build_model
from caption.models.captioner import Captioner
from caption.overrides import hydra_command
from caption.resume import StopSignals, capture_rng, restore_rng, resume_path, sync_metrics
from caption.runtime import configure_cpu
from caption.speed import Precision, compile_model, images_to_device, to_channels_last

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 100,
    final_lr_ratio: float = 0.05,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `final_lr_ratio` of the base lr at `total_steps`.

    Args:
        optimizer: whose learning rates to scale.
        total_steps: the run's length in optimizer steps.
        warmup_steps: steps of linear warm-up from 0.
        final_lr_ratio: the lr at the end, as a fraction of the base lr.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The base learning rate throughout."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _optimizer(
    cfg: DictConfig, model: torch.nn.Module
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """The optimizer over the decoder and the encoder's tunable blocks, in two groups.

    The encoder's top-k blocks are in the optimizer from the start, even while they wait for
    `fine_tune_from_epoch` (frozen parameters have no grad, so the optimizer skips them), so
    the groups never change and a resumed run loads the same optimizer state. They get
    `model.encoder.lr` when it is set.
    """
    encoder = model.encoder
    in_encoder = {id(p) for p in encoder.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_encoder]
    tunable = encoder.tunable_parameters()
    groups = [{"params": rest}]
    if tunable:
        groups.append({"params": tunable, **({"lr": encoder.lr} if encoder.lr else {})})
    return instantiate(cfg.optimizer)(params=groups), rest + tunable


def _overrides() -> list[str]:
    """The command-line overrides of this Hydra run (empty when `train` is called directly)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _absolute_data_paths(cfg: DictConfig) -> None:
    """Store data paths absolutely, so that a checkpoint evaluates from any working dir."""
    for key in ("annotations", "images", "splits_file"):
        if cfg.data.get(key):
            cfg.data[key] = absolute_spec(cfg.data[key])


def _deterministic(on: bool) -> None:
    """Make every op deterministic (or back to torch's defaults).

    On the CPU training is deterministic already; this pins down the CUDA kernels that are not
    (atomics in index/scatter backward, cuBLAS workspaces, cuDNN autotuning).
    """
    if on:
        # cuBLAS reads this when its handle is made, so it must be set before the first matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False


def _fresh_progress() -> dict[str, Any]:
    """Where a run stands: finished epochs and steps, the position inside the next epoch and
    its running sums, and early stopping's state."""
    return {
        "epoch": 0,
        "step": 0,
        "position": 0,  # samples of epoch `epoch + 1` already trained on (all ranks together)
        "partial": _fresh_partial(),
        "best_bleu4": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
    }


def _fresh_partial() -> dict[str, Any]:
    return {
        "sums": {"loss": 0.0, "nll": 0.0, "attention_reg": 0.0},
        "batches": 0,
        "images": 0,
        "words": 0,
        "seconds": 0.0,
        "skipped": 0,
    }


def _restore(
    ckpt: dict[str, Any],
    path: Path,
    dist: Dist,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    vocab: Vocabulary,
    batch_size: int,
) -> dict[str, Any]:
    """Load a checkpoint's training state into the run; return its progress.

    The RNG states are not restored here: setting up the run draws random numbers, so the
    caller restores them last (`_restore_rng`).
    """
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
    progress = {**_fresh_progress(), **ckpt["progress"]}
    # A checkpoint of an older version lacks newer running sums (the words, for one).
    progress["partial"] = {**_fresh_partial(), **progress["partial"]}
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


def _restore_rng(ckpt: dict[str, Any], dist: Dist) -> None:
    """This rank's generator states from the checkpoint (one entry per rank)."""
    rng = ckpt.get("rng")
    if isinstance(rng, torch.Tensor):  # format version 1: torch's CPU generator only
        torch.set_rng_state(rng)
        log.warning("resume: a version 1 checkpoint holds torch's RNG only; not an exact resume")
    elif isinstance(rng, list) and rng:
        restore_rng(rng[dist.rank] if len(rng) == dist.world_size else rng[0])


def _copy_metrics(ckpt_path: Path, run_dir: Path) -> None:
    """Resuming another run into a new run dir: start from that run's metrics."""
    source = ckpt_path.parent.parent / "metrics.jsonl"
    target = run_dir / "metrics.jsonl"
    fresh = ckpt_path.parent.name == "checkpoints" and not target.exists()
    if fresh and source.is_file() and source.resolve() != target.resolve():
        with atomic_file(target) as f:
            f.write(source.read_text())


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train a captioner as `cfg` says; return a summary of the run.

    Writes `<run_dir>/checkpoints/{last,best}.pt` and appends one JSON line per epoch to
    `<run_dir>/metrics.jsonl`. Under `torchrun` every process runs this; rank 0 writes.
    """
    check_train_config(cfg)
    dist = init_distributed(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        _deterministic(cfg.trainer.deterministic)
        return _train(cfg, dist)
    finally:
        _deterministic(was_deterministic)
        shutdown(dist)


def _train(cfg: DictConfig, dist: Dist) -> dict[str, Any]:
    configure_cpu()
    t = cfg.trainer
    device = dist.device
    precision = Precision(t.precision, device)
    if not dist.is_main:  # one copy of the log: rank 0's (warnings still come from all)
        logging.getLogger().setLevel(logging.WARNING)
    # Each rank's Hydra may have picked its own timestamped dir: rank 0's is the run's.
    run_dir = Path(broadcast_object(dist, str(cfg.run_dir)))
    ckpt_dir = run_dir / "checkpoints"
    _absolute_data_paths(cfg)
    seed_everything(t.seed)

    d = cfg.data
    splits = read_dataset(d.annotations, d.images, d.format, d.splits_file)
    check_images(splits)
    if not splits["train"]:
        raise CaptionError(f"data.annotations: {cfg.data.annotations} has no train images")
    vocab = Vocabulary.build(
        (c for r in splits["train"] for c in r.captions),
        min_count=cfg.data.min_count,
        max_size=cfg.data.vocab_size,
    )
    model = build_model(cfg.model, len(vocab)).to(device)
    if t.channels_last:
        to_channels_last(model)
    broadcast_module(dist, model)  # identical already (same seed); now certainly
    preload = d.preload and not d.feature_cache  # the cache replaces images in memory
    images = {"max_pixels": d.max_image_pixels, "strict": d.strict_images}
    train_bank = ImageBank(splits["train"], d.image_size, preload, **images)
    # Rank 0 validates; the others wait for its result.
    val_records = splits["val"][: t.val_max_images] if dist.is_main else []
    val_bank = ImageBank(val_records, d.image_size, preload, **images)
    if d.feature_cache:  # a frozen encoder's vectors, computed once: epochs run the decoder only
        cache = {
            "root": d.feature_cache_dir,
            "dtype": d.feature_cache_dtype,
            "batch_size": d.batch_size,
            "num_workers": d.num_workers,
            "device": device,
        }
        # Rank 0 builds each entry; the others wait, then read it.
        if dist.is_main:
            train_bank = FeatureBank.build(model.encoder, train_bank, **cache)
        barrier(dist)
        if not dist.is_main:
            train_bank = FeatureBank.build(model.encoder, train_bank, **cache)
        val_bank = (
            FeatureBank.build(model.encoder, val_bank, **cache) if len(val_bank) else val_bank
        )
    if t.features_only:  # one cache for a sweep: its runs then read it, none builds it
        log.info("features only: the cache in %s is ready; stopping", d.feature_cache_dir)
        return {"run_dir": str(run_dir), "features_only": True}
    train_set = CaptionDataset(train_bank, vocab, cfg.data.max_caption_len)
    log.info(
        "data: %d train images (%d captions), %d val images, vocabulary %d words",
        len(train_bank),
        len(train_set),
        len(val_bank),
        len(vocab),
    )
    sampler = EpochSampler(len(train_set), t.seed, dist.rank, dist.world_size)
    loader = DataLoader(
        train_set,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        collate_fn=collate_captions,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,  # workers live across epochs
        pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
        # Its own generator: creating an epoch's iterator must not draw from the global one.
        generator=torch.Generator().manual_seed(t.seed),
        worker_init_fn=_ignore_stop_signals,
    )
    step_samples = cfg.data.batch_size * dist.world_size  # one step, all ranks together

    optimizer, params = _optimizer(cfg, model)
    total_steps = t.max_epochs * len(loader)
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=total_steps)
    n_params = sum(p.numel() for p in params)
    log.info(
        "model: %s trainable parameters, device %s, %d process(es)",
        f"{n_params:,}",
        device,
        dist.world_size,
    )

    config = OmegaConf.to_container(cfg, resolve=True)
    progress = _fresh_progress()
    if dist.enabled:  # the same init everywhere, but each rank its own dropout masks
        torch.manual_seed(t.seed + dist.rank)
    ckpt_path = resume_path(cfg.resume if cfg.resume else bool(t.resume), run_dir)
    if ckpt_path is not None:
        # Rank 0 reads the file (safely) and hands it on: other machines need no copy of it.
        ckpt = load_checkpoint(ckpt_path, map_location="cpu") if dist.is_main else None
        ckpt = broadcast_object(dist, ckpt)
        progress = _restore(
            ckpt,
            ckpt_path,
            dist,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            vocab=vocab,
            batch_size=cfg.data.batch_size,
        )
        if dist.is_main:
            _copy_metrics(ckpt_path, run_dir)
            sync_metrics(run_dir / "metrics.jsonl", progress["epoch"], ckpt.get("metrics"))
        _restore_rng(ckpt, dist)  # last: everything above may draw random numbers
        del ckpt
    progress.update(world_size=dist.world_size, batch_size=cfg.data.batch_size)

    # The checkpoint a resume would continue from, named if a later write fails.
    intact = _Intact.resumed(ckpt_path, run_dir, progress["step"])

    def save(name: str, row: dict[str, Any] | None = None) -> None:
        """Write a checkpoint of the run as it stands (every rank calls it: RNG is gathered)."""
        nonlocal intact
        rng = gather_objects(dist, capture_rng())
        if not dist.is_main:
            return
        with intact.reported():
            save_checkpoint(
                ckpt_dir / name,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                config=config,
                vocab=vocab.itos,
                progress=progress,
                rng=rng,
                metrics=row,
            )
        if name == "last.pt":
            intact = _Intact(ckpt_dir / name, progress["step"], run_dir)

    if t.compile:  # after loading weights: compiling wraps methods, not the state dict
        compile_model(model)
    metrics_file = run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    train_seconds, train_images, train_words = 0.0, 0, 0
    stop = progress["step"] >= (t.max_steps or math.inf)
    with StopSignals() as signals:
        log.info(
            "training from epoch %d, step %d (SIGTERM or Ctrl-C saves last.pt, then stops)",
            progress["epoch"] + 1,
            progress["step"],
        )
        while progress["epoch"] < t.max_epochs and not stop:
            epoch = progress["epoch"] + 1
            if model.encoder.set_epoch(epoch):
                log.info(
                    "encoder: training its top %d blocks from epoch %d",
                    model.encoder.trainable_top,
                    epoch,
                )
            model.train()
            part = progress["partial"]
            sampler.set_epoch(epoch, progress["position"])
            start = time.perf_counter()
            bar = tqdm(
                loader,
                desc=f"epoch {epoch}",
                disable=not t.progress or not dist.is_main,
                leave=False,
                mininterval=1.0,
                unit="batch",
            )
            for batch in bar:
                part["skipped"] += _report_skipped(batch.skipped, d.strict_images)
                losses = _step(batch, model, optimizer, scheduler, params, dist, t, precision)
                for k in part["sums"]:
                    part["sums"][k] += losses[k]
                part["batches"] += 1
                part["images"] += len(batch.images)
                # Predicted words, <end> included.
                part["words"] += int(batch.lengths.sum()) - len(batch.lengths)
                progress["step"] += 1
                progress["position"] = min(len(train_set), progress["position"] + step_samples)
                speed = part["images"] / (part["seconds"] + time.perf_counter() - start)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", img_s=f"{speed:.0f}", refresh=False)
                if t.max_steps and progress["step"] >= t.max_steps:
                    stop = True
                    break
                interrupted = any_rank(dist, signals.received is not None)
                due = t.checkpoint_every and progress["step"] % t.checkpoint_every == 0
                if interrupted or due:
                    part["seconds"] += time.perf_counter() - start
                    start = time.perf_counter()
                    save("last.pt")
                    log.info(
                        "saved %s at step %d (epoch %d, sample %d of %d)",
                        ckpt_dir / "last.pt",
                        progress["step"],
                        epoch,
                        progress["position"],
                        len(train_set),
                    )
                if interrupted:
                    return _interrupted(signals.name, progress, run_dir, dist)
            part["seconds"] += time.perf_counter() - start
            train_seconds += part["seconds"]
            train_images += part["images"]
            train_words += part["words"]
            skipped = all_reduce_sum(dist, torch.tensor([float(part["skipped"])]))
            part["skipped"] = int(skipped.item())  # every rank's, for the log and metrics
            if part["skipped"]:
                log.warning("epoch %d: skipped %d unreadable image(s)", epoch, part["skipped"])

            row: dict[str, Any] = {
                "epoch": epoch,
                "step": progress["step"],
                **{f"train_{k}": v / max(part["batches"], 1) for k, v in part["sums"].items()},
                "images_per_sec": part["images"] / max(part["seconds"], 1e-9),
                "words_per_sec": part["words"] / max(part["seconds"], 1e-9),
                "epoch_seconds": part["seconds"],
                **({"skipped_images": part["skipped"]} if part["skipped"] else {}),
            }
            val = None
            if dist.is_main and len(val_bank):
                val, _ = score_bank(model, val_bank, vocab, device=device, **t.val)
            val = broadcast_object(dist, val)
            if val is not None:
                row.update({f"val_{k}": v for k, v in val.items()})
                improved = val["bleu4"] > progress["best_bleu4"]
            else:  # no val split: the latest model is the best we know
                improved = True
            progress.update(epoch=epoch, position=0, partial=_fresh_partial())
            if improved:
                progress.update(
                    best_bleu4=row.get("val_bleu4", -1.0), best_epoch=epoch, bad_epochs=0
                )
            else:
                progress["bad_epochs"] += 1
            log.info(
                "epoch %d step %d: loss %.4f, val BLEU-4 %s, %.0f images/s%s",
                epoch,
                progress["step"],
                row["train_loss"],
                f"{row['val_bleu4']:.4f}" if "val_bleu4" in row else "n/a",
                row["images_per_sec"],
                " (best)" if improved else "",
            )
            # best before last, and both before the metrics row: a kill between any two leaves
            # a last.pt to resume from that redoes (or, via sync_metrics, records) the rest.
            if improved:
                save("best.pt", row)
            save("last.pt", row)
            if dist.is_main:
                with intact.reported():
                    _append_row(metrics_file, row)
            if t.patience and progress["bad_epochs"] >= t.patience:
                log.info("early stopping: no val BLEU-4 gain in %d epochs", t.patience)
                stop = True

    summary = {
        "run_dir": str(run_dir),
        "epochs": progress["epoch"],
        "steps": progress["step"],
        "best_epoch": progress["best_epoch"],
        "best_val_bleu4": progress["best_bleu4"],
        "train_seconds": train_seconds,
        "images_per_sec": train_images / train_seconds if train_seconds else 0.0,
        "words_per_sec": train_words / train_seconds if train_seconds else 0.0,
        "parameters": n_params,
        "processes": dist.world_size,
        "overrides": _overrides(),
    }
    if dist.is_main:
        with intact.reported(), atomic_file(run_dir / "summary.json") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    log.info("done: %s", json.dumps(summary))
    return summary


def _step(
    batch: CaptionBatch,
    model: Captioner,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    dist: Dist,
    trainer: DictConfig,
    precision: Precision,
) -> dict[str, float]:
    """One optimizer step on this rank's batch, gradients summed over the ranks.

    Returns:
        The step's loss terms, of the combined batch of all ranks.
    """
    device = dist.device
    images = images_to_device(batch.images, device, trainer.channels_last)
    captions = batch.captions.to(device, non_blocking=True)
    totals = None
    if dist.enabled:  # divide by the job's words and images, so that grads sum to the total
        words = (captions[:, 1:] != PAD_ID).sum() if len(captions) else 0
        totals = all_reduce_sum(dist, torch.tensor([float(words), float(len(images))]))
        totals = totals.to(device)
    images_in_step = len(images) if totals is None else totals[1]  # all ranks together
    if images_in_step == 0:
        return dict.fromkeys(("loss", "nll", "attention_reg"), 0.0)  # no image read, no step
    loss = None  # every image of this rank's batch was unreadable: it adds zeros, but takes part
    values = torch.zeros(3, device=device)
    if len(images):
        with precision.autocast():
            losses = model.loss(images, captions, totals=totals)
        loss = losses.loss
        values = torch.stack([losses.loss, losses.nll, losses.attention_reg]).detach().float()
    precision.step(
        loss,
        optimizer,
        params,
        trainer.grad_clip,
        reduce=lambda: all_reduce_gradients(dist, params),
    )
    scheduler.step()
    average_buffers(dist, model)
    values = all_reduce_sum(dist, values).tolist()
    return dict(zip(("loss", "nll", "attention_reg"), values, strict=True))


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which saves and then
    shuts them down; a worker killed by Ctrl-C would break the batch being saved after."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _report_skipped(skipped: tuple[str, ...], strict: bool) -> int:
    """Warn about each unreadable image of a batch, or stop on the first in strict mode."""
    if skipped and strict:
        raise strict_stop(skipped[0])
    for reason in skipped:
        log.warning("%s; skipped", reason)
    return len(skipped)


@dataclass(frozen=True)
class _Intact:
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
    def resumed(cls, ckpt_path: Path | None, run_dir: Path, step: int) -> _Intact:
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


def _append_row(metrics_file: Path, row: dict[str, Any]) -> None:
    """Add one epoch's row to `metrics.jsonl`, atomically: a disk that fills up mid-write
    leaves the rows before it, never a cut line (the file is one short row per epoch)."""
    before = metrics_file.read_text() if metrics_file.is_file() else ""
    if before and not before.endswith("\n"):  # a line cut short by an older version
        before = before[: before.rfind("\n") + 1]
    with atomic_file(metrics_file) as f:
        f.write(before + json.dumps(row) + "\n")


def _interrupted(name: str | None, progress: dict[str, Any], run_dir: Path, dist: Dist) -> dict:
    """The summary of a run stopped by a signal after saving its state."""
    log.warning(
        "%s: stopped at step %d after saving; continue with caption-train resume=%s",
        name,
        progress["step"],
        run_dir,
    )
    return {"run_dir": str(run_dir), "steps": progress["step"], "interrupted": name}


@hydra_command("caption-train", "train")
def main(cfg: DictConfig) -> float:
    summary = train(cfg)
    if summary.get("interrupted"):  # saved; exit as the signal would have, 128 + its number
        sys.exit(128 + signal.Signals[summary["interrupted"]].value)
    # What a Hydra sweeper would optimise; a features-only run has nothing to offer it.
    return summary.get("best_val_bleu4", math.nan)


if __name__ == "__main__":
    main()

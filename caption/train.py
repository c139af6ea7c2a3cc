"""`caption-train`: teacher-forced training, validation by real decoding, early stopping.

`train(cfg)` does the work and is what tests call; `main` is the Hydra wrapper.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from caption.checkpoint import build_model, load_checkpoint, save_checkpoint
from caption.config import CONF_DIR, check_train_config, resolve_device
from caption.data.dataset import CaptionDataset, ImageBank, collate_captions
from caption.data.features import FeatureBank
from caption.data.formats import absolute_spec, check_images, read_dataset
from caption.data.vocab import Vocabulary
from caption.errors import CaptionError, cli_guard
from caption.inference import score_bank
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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train a captioner as `cfg` says; return a summary of the run.

    Writes `<run_dir>/checkpoints/{last,best}.pt` and appends one JSON line per epoch to
    `<run_dir>/metrics.jsonl`.
    """
    check_train_config(cfg)
    configure_cpu()
    device = resolve_device(cfg.trainer.device)
    precision = Precision(cfg.trainer.precision, device)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    _absolute_data_paths(cfg)
    seed_everything(cfg.trainer.seed)

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
    if cfg.trainer.channels_last:
        to_channels_last(model)
    preload = d.preload and not d.feature_cache  # the cache replaces images in memory
    train_bank = ImageBank(splits["train"], d.image_size, preload)
    val_bank = ImageBank(splits["val"][: cfg.trainer.val_max_images], d.image_size, preload)
    if d.feature_cache:  # a frozen encoder's vectors, computed once: epochs run the decoder only
        cache = {
            "root": d.feature_cache_dir,
            "dtype": d.feature_cache_dtype,
            "batch_size": d.batch_size,
            "num_workers": d.num_workers,
            "device": device,
        }
        train_bank = FeatureBank.build(model.encoder, train_bank, **cache)
        val_bank = (
            FeatureBank.build(model.encoder, val_bank, **cache) if len(val_bank) else val_bank
        )
    train_set = CaptionDataset(train_bank, vocab, cfg.data.max_caption_len)
    log.info(
        "data: %d train images (%d captions), %d val images, vocabulary %d words",
        len(train_bank),
        len(train_set),
        len(val_bank),
        len(vocab),
    )
    loader = DataLoader(
        train_set,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        collate_fn=collate_captions,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,  # workers live across epochs
        pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
        generator=torch.Generator().manual_seed(cfg.trainer.seed),
    )

    optimizer, params = _optimizer(cfg, model)
    total_steps = cfg.trainer.max_epochs * len(loader)
    if cfg.trainer.max_steps:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=total_steps)
    n_params = sum(p.numel() for p in params)
    log.info("model: %s trainable parameters, device %s", f"{n_params:,}", device)

    config = OmegaConf.to_container(cfg, resolve=True)
    progress = {"epoch": 0, "step": 0, "best_bleu4": -1.0, "best_epoch": -1, "bad_epochs": 0}
    if cfg.trainer.resume and (ckpt_dir / "last.pt").is_file():
        ckpt = load_checkpoint(ckpt_dir / "last.pt", map_location=device)
        if ckpt["vocab"] != vocab.itos:
            raise CaptionError(
                f"trainer.resume: {ckpt_dir / 'last.pt'} was trained with another "
                "vocabulary; resume with the same data, or start a new run dir"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        progress = ckpt["progress"]
        torch.set_rng_state(ckpt["rng"])
        log.info(
            "resumed from %s at epoch %d, step %d",
            ckpt_dir / "last.pt",
            progress["epoch"],
            progress["step"],
        )

    t = cfg.trainer
    if t.compile:  # after loading weights: compiling wraps methods, not the state dict
        compile_model(model)
    metrics_file = run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    train_seconds, train_images, train_words = 0.0, 0, 0
    stop = False
    while progress["epoch"] < t.max_epochs and not stop:
        epoch = progress["epoch"] + 1
        if model.encoder.set_epoch(epoch):
            log.info(
                "encoder: training its top %d blocks from epoch %d",
                model.encoder.trainable_top,
                epoch,
            )
        model.train()
        sums = {"loss": 0.0, "nll": 0.0, "attention_reg": 0.0}
        n_batches, epoch_images, epoch_words, start = 0, 0, 0, time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}",
            disable=not t.progress,
            leave=False,
            mininterval=1.0,
            unit="batch",
        )
        for images, captions, lengths in bar:
            images = images_to_device(images, device, t.channels_last)
            captions = captions.to(device, non_blocking=True)
            with precision.autocast():
                losses = model.loss(images, captions)
            precision.step(losses.loss, optimizer, params, t.grad_clip)
            scheduler.step()
            for k in sums:
                sums[k] += getattr(losses, k).item()
            n_batches += 1
            epoch_images += len(images)
            epoch_words += int(lengths.sum()) - len(lengths)  # predicted words, <end> included
            progress["step"] += 1
            speed = epoch_images / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{losses.loss.item():.3f}", img_s=f"{speed:.0f}", refresh=False)
            if t.max_steps and progress["step"] >= t.max_steps:
                stop = True
                break
        seconds = time.perf_counter() - start
        train_seconds += seconds
        train_images += epoch_images
        train_words += epoch_words
        progress["epoch"] = epoch

        row: dict[str, Any] = {
            "epoch": epoch,
            "step": progress["step"],
            **{f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()},
            "images_per_sec": epoch_images / seconds,
            "words_per_sec": epoch_words / seconds,
            "epoch_seconds": seconds,
        }
        if len(val_bank):
            val, _ = score_bank(model, val_bank, vocab, device=device, **t.val)
            row.update({f"val_{k}": v for k, v in val.items()})
            improved = val["bleu4"] > progress["best_bleu4"]
        else:  # no val split: the latest model is the best we know
            improved = True
        if improved:
            progress.update(best_bleu4=row.get("val_bleu4", -1.0), best_epoch=epoch, bad_epochs=0)
        else:
            progress["bad_epochs"] += 1
        with metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info(
            "epoch %d step %d: loss %.4f, val BLEU-4 %s, %.0f images/s%s",
            epoch,
            progress["step"],
            row["train_loss"],
            f"{row['val_bleu4']:.4f}" if "val_bleu4" in row else "n/a",
            row["images_per_sec"],
            " (best)" if improved else "",
        )

        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": config,
            "vocab": vocab.itos,
            "progress": progress,
            "rng": torch.get_rng_state(),
            "metrics": row,
        }
        save_checkpoint(ckpt_dir / "last.pt", **state)
        if improved:
            save_checkpoint(ckpt_dir / "best.pt", **state)
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
        "overrides": _overrides(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done: %s", json.dumps(summary))
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@cli_guard
def main(cfg: DictConfig) -> float:
    summary = train(cfg)
    return summary["best_val_bleu4"]  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    main()

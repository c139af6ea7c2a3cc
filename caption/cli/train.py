"""`caption-train`: build a run from its config, then hand it to `caption.training.Trainer`.

`train(cfg)` does the work and is what tests call; `main` is the Hydra wrapper.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from caption.config import check_train_config
from caption.data.vocab import Vocabulary
from caption.errors import CaptionError
from caption.models.build import build_model, load_captioner
from caption.models.captioner import Captioner
from caption.overrides import hydra_command
from caption.runtime import configure_cpu
from caption.speed import Precision, to_channels_last
from caption.training.data import absolute_data_paths, build_banks, read_records
from caption.training.dist import Dist
from caption.training.resume import resume_path
from caption.training.trainer import Trainer, deterministic, seed_everything

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train a captioner as `cfg` says; return a summary of the run.

    Writes `<run_dir>/checkpoints/{last,best}.pt` and appends one JSON line per epoch to
    `<run_dir>/metrics.jsonl`. Under `torchrun` every process runs this; rank 0 writes.
    """
    check_train_config(cfg)
    t, d = cfg.trainer, cfg.data
    with Dist.from_env(t.device, t.dist_timeout_s) as dist, deterministic(t.deterministic):
        configure_cpu()
        precision = Precision(t.precision, dist.device)
        if not dist.is_main:  # one copy of the log: rank 0's (warnings still come from all)
            logging.getLogger().setLevel(logging.WARNING)
        # Each rank's Hydra may have picked its own timestamped dir: rank 0's is the run's.
        run_dir = Path(dist.broadcast_object(str(cfg.run_dir)))
        absolute_data_paths(d)
        seed_everything(t.seed)
        splits, vocab = read_records(d)
        if cfg.get("init_from"):
            model, vocab = initial_model(cfg, Path(cfg.init_from))
            model = model.to(dist.device)
        else:
            model = build_model(cfg.model, len(vocab)).to(dist.device)
        if t.channels_last:
            to_channels_last(model)
        dist.broadcast_module(model)  # identical already (same seed); now certainly
        train_bank, val_bank = build_banks(d, splits, model.encoder, dist, t.val_max_images)
        if t.features_only:  # one cache for a sweep: its runs then read it, none builds it
            log.info("features only: the cache in %s is ready; stopping", d.feature_cache_dir)
            return {"run_dir": str(run_dir), "features_only": True}
        trainer = Trainer(
            cfg,
            dist,
            run_dir=run_dir,
            model=model,
            vocab=vocab,
            train_bank=train_bank,
            val_bank=val_bank,
            precision=precision,
            overrides=_overrides(),
        )
        return trainer.fit(resume_path(cfg.resume, run_dir))


def initial_model(cfg: DictConfig, path: Path) -> tuple[Captioner, Vocabulary]:
    """The model and vocabulary of the checkpoint `init_from` names, weights only.

    Its model config replaces `cfg.model`, so that this run's checkpoints describe the model
    they hold; the data must be resized as that model was trained.
    """
    model, vocab, stored = load_captioner(path)
    if model.image_size != cfg.data.image_size:
        raise CaptionError(
            f"init_from: {path} takes {model.image_size}x{model.image_size} images, but "
            f"data.image_size={cfg.data.image_size}; set data.image_size={model.image_size}"
        )
    with open_dict(cfg):
        cfg.model = stored.model
    log.info("init_from: the weights, model config and vocabulary of %s", path)
    return model.train(), vocab


def _overrides() -> list[str]:
    """The command-line overrides of this Hydra run (empty when `train` is called directly)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@hydra_command("caption-train", "train")
def main(cfg: DictConfig) -> float:
    summary = train(cfg)
    if summary.get("interrupted"):  # saved; exit as the signal would have, 128 + its number
        sys.exit(128 + signal.Signals[summary["interrupted"]].value)
    # What a Hydra sweeper would optimise; a features-only run has nothing to offer it.
    return summary.get("best_val_bleu4", math.nan)


if __name__ == "__main__":
    main()

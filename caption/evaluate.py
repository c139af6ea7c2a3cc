"""`caption-evaluate`: decode each image of a split once and score it against all references."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from caption.checkpoint import load_captioner
from caption.config import CONF_DIR, check_choice, check_decoding, resolve_device
from caption.data.dataset import ImageBank
from caption.data.karpathy import SPLITS, read_karpathy
from caption.errors import CaptionError, cli_guard
from caption.inference import grounding_metrics, score_bank

log = logging.getLogger(__name__)


def default_output(checkpoint: str | Path, split: str) -> Path:
    """`<run dir>/eval_<split>.json` for a checkpoint in `<run dir>/checkpoints/`."""
    folder = Path(checkpoint).parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"eval_{split}.json"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score a checkpoint on a split with BLEU-1..4 and write the metrics JSON.

    On a dataset whose images carry `objects` (the shapes set), the grounding scores of
    `caption.grounding` join them: for the generated captions, a uniform-attention baseline
    and the reference captions under teacher forcing.

    Returns:
        The metrics: `bleu1`..`bleu4`, the grounding keys where there are objects, plus
        `n_images` and the decoding settings.
    """
    check_choice(cfg, "split", SPLITS)
    check_decoding(cfg)
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)  # see train(): denormals in attention are slow on CPUs
    model, vocab, train_cfg = load_captioner(cfg.checkpoint, device)
    annotations = cfg.annotations or train_cfg.data.annotations
    # Images default to the checkpoint's only when the annotations do too.
    images = cfg.images or (None if cfg.annotations else train_cfg.data.images)
    records = read_karpathy(annotations, images)[cfg.split]
    if not records:
        raise CaptionError(f"split: {annotations} has no {cfg.split!r} images; pick another split=")
    bank = ImageBank(records, train_cfg.data.image_size, preload=True)
    metrics, captions = score_bank(
        model,
        bank,
        vocab,
        strategy=cfg.strategy,
        beam_size=cfg.beam_size,
        max_len=cfg.max_len,
        batch_size=cfg.batch_size,
        device=device,
    )
    if any(r.objects for r in bank.records):
        metrics.update(
            grounding_metrics(
                model, bank, vocab, captions, batch_size=cfg.batch_size, device=device
            )
        )
    metrics = {
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
        "n_images": len(bank),
        "split": cfg.split,
        "strategy": cfg.strategy,
        "beam_size": cfg.beam_size if cfg.strategy == "beam" else 1,
    }
    output = Path(cfg.output) if cfg.output else default_output(cfg.checkpoint, cfg.split)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(metrics, indent=2) + "\n")
    if cfg.captions:
        with open(cfg.captions, "w") as f:
            for record, c in zip(bank.records, captions, strict=True):
                f.write(
                    json.dumps(
                        {
                            "image": str(record.path),
                            "caption": " ".join(c["tokens"]),
                            "log_prob": round(c["log_prob"], 4),
                        }
                    )
                    + "\n"
                )
    log.info("wrote %s", output)
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column text table of the numeric metrics."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@cli_guard
def main(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    print(format_table(metrics))
    print(json.dumps(metrics), flush=True)  # last stdout line: machine-readable


if __name__ == "__main__":
    main()

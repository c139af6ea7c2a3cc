"""`caption-evaluate`: decode each image of a split once and score it against all references."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from caption.config import (
    check_bool,
    check_choice,
    check_decoding,
    decoding_options,
    resolve_device,
)
from caption.data.dataset import ImageBank
from caption.data.formats import check_images, read_split
from caption.data.records import SPLITS, ImageRecord
from caption.errors import CaptionError
from caption.evaluation.decode import caption_line, decode_bank, grounding_metrics
from caption.evaluation.results import load_results
from caption.files import advice, advised, atomic_file
from caption.metrics import bleu, coco_metrics, repeated_trigram_rate
from caption.models.build import load_captioner
from caption.overrides import hydra_command
from caption.runtime import configure_cpu

log = logging.getLogger(__name__)


def default_output(checkpoint: str | Path, split: str) -> Path:
    """`<run dir>/eval_<split>.json` for a checkpoint in `<run dir>/checkpoints/`."""
    folder = Path(checkpoint).parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"eval_{split}.json"


def _records(cfg: DictConfig, train_data: DictConfig | None) -> list[ImageRecord]:
    """The split's records: from `annotations=`, else the `data=` group, else the checkpoint's."""
    if cfg.annotations:  # images default to the checkpoint's only when the annotations do too
        source = {"annotations": cfg.annotations, "images": cfg.images, "format": "auto"}
    elif cfg.get("data"):
        source = cfg.data
    elif train_data is not None:
        source = train_data
    else:
        raise CaptionError(
            "results: name the dataset to score against with data=<shapes|"
            "flickr8k|flickr30k|coco> or annotations=<file>"
        )
    return read_split(source, cfg.split, "karpathy")


def text_metrics(
    records: list[ImageRecord], hypotheses: list[list[str]], cfg: DictConfig
) -> dict[str, float]:
    """BLEU-1..4, and METEOR, ROUGE-L and CIDEr-D unless `coco_metrics=false`; and the
    fraction of captions that repeat a trigram (`repeated_trigrams`)."""
    references = [r.captions for r in records]
    metrics = bleu(references, hypotheses)
    metrics["repeated_trigrams"] = repeated_trigram_rate(hypotheses)
    if cfg.coco_metrics:
        metrics.update(
            coco_metrics(
                [[" ".join(c) for c in refs] for refs in references],
                [" ".join(h) for h in hypotheses],
                spice=cfg.spice,
            )
        )
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score a checkpoint, or a file of captions, on a split, and write the metrics JSON.

    With `checkpoint=`, each image is decoded once. On a dataset whose images carry `objects`
    (the shapes set), the grounding scores of `caption.evaluation.grounding` join the
    metrics: for the generated captions, a uniform-attention baseline and the reference
    captions under teacher forcing. With `results=`, the captions in that file are scored, no
    model needed.

    Returns:
        The metrics: `bleu1`..`bleu4`, `meteor`, `rouge_l`, `cider`, the grounding keys where
        there are objects, plus `n_images` (the images scored), `partial` and the decoding
        settings.
    """
    check_choice(cfg, "split", SPLITS)
    check_bool(cfg, "partial")
    if bool(cfg.checkpoint) == bool(cfg.results):
        raise CaptionError(
            "caption-evaluate: pass either checkpoint=<file> or results=<captions file>"
        )
    if cfg.results:
        return _score_results(cfg)
    if cfg.partial:
        raise CaptionError(
            "partial: partial=true scores a results= file on the images it captions; a "
            "checkpoint= captions the whole split, so drop partial=true"
        )

    check_decoding(cfg)
    device = resolve_device(cfg.device)
    configure_cpu()
    model, vocab, train_cfg = load_captioner(cfg.checkpoint, device)
    records = _records(cfg, train_cfg.data)
    check_images({cfg.split: records})
    bank = ImageBank(records, model.image_size, preload=True)
    captions = decode_bank(
        model,
        bank,
        vocab,
        batch_size=cfg.batch_size,
        device=device,
        **decoding_options(cfg),
    )
    metrics = text_metrics(bank.records, [c["tokens"] for c in captions], cfg)
    if any(r.objects for r in bank.records):
        metrics.update(
            grounding_metrics(
                model, bank, vocab, captions, batch_size=cfg.batch_size, device=device
            )
        )
    metrics = {
        **_rounded(metrics),
        "n_images": len(bank),
        "partial": False,
        "split": cfg.split,
        "strategy": cfg.strategy,
        "beam_size": cfg.beam_size if cfg.strategy == "beam" else 1,
        "allow_unk": cfg.allow_unk,
        "length_penalty": cfg.length_penalty,
        "block_trigrams": cfg.block_trigrams,
    }
    output = Path(cfg.output) if cfg.output else default_output(cfg.checkpoint, cfg.split)
    written: list[Path] = []  # named if a later write fails: those files are whole
    _write(output, json.dumps(metrics, indent=2) + "\n", "output", written)
    coco = Path(cfg.coco_results or output.with_name(f"captions_{cfg.split}_coco.json"))
    results = [
        {"image_id": r.imgid, "caption": " ".join(c["tokens"])}
        for r, c in zip(bank.records, captions, strict=True)
    ]
    _write(coco, json.dumps(results, indent=2) + "\n", "coco_results", written)
    if cfg.captions:
        lines = [
            caption_line(record.path, c["tokens"], c["log_prob"])
            for record, c in zip(bank.records, captions, strict=True)
        ]
        _write(Path(cfg.captions), "".join(lines), "captions", written)
    return metrics


def _score_results(cfg: DictConfig) -> dict[str, Any]:
    """Score the captions file `cfg.results` on its split and write the metrics JSON.

    With `partial=true`, only the images the file captions are scored, against their own
    references, and the log says how many of the split were left out.
    """
    records = _records(cfg, None)
    covered, captions = load_results(cfg.results, records, cfg.partial)
    if cfg.partial:
        log.info(
            "results: scored %d of %d %s images; %d have no caption in %s (partial=true)",
            len(covered),
            len(records),
            cfg.split,
            len(records) - len(covered),
            cfg.results,
        )
    metrics = {
        **_rounded(text_metrics(covered, captions, cfg)),
        "n_images": len(covered),
        "partial": cfg.partial,
        "split": cfg.split,
    }
    results = Path(cfg.results)
    output = Path(cfg.output or results.with_name(f"{results.stem}_eval_{cfg.split}.json"))
    _write(output, json.dumps(metrics, indent=2) + "\n", "output", [])
    return metrics


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def _write(path: Path, text: str, key: str, written: list[Path]) -> None:
    """Write one output file whole or not at all, and add it to `written`.

    Args:
        path: the file.
        text: its content.
        key: the option that names it, for the error: `output`, `coco_results`, `captions`.
        written: the files this run wrote before, named in the error.
    """
    done = f"; {', '.join(map(str, written))} written" if written else ""
    hint = advised(lambda e: f"{advice(e.errno)}, or pass {key}=<another file>{done}")
    with hint, atomic_file(path) as f:
        f.write(text)
    written.append(path)
    log.info("wrote %s", path)


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column text table of the numeric metrics."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@hydra_command("caption-evaluate", "evaluate")
def main(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    print(format_table(metrics))
    print(json.dumps(metrics), flush=True)  # last stdout line: machine-readable


if __name__ == "__main__":
    main()

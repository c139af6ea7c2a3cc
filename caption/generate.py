"""`caption-generate`: caption image files with a trained checkpoint, as JSON Lines."""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from caption.checkpoint import load_captioner
from caption.config import check_decoding, check_float, check_int, resolve_device
from caption.data.images import expand_images
from caption.inference import caption_files, caption_line
from caption.overrides import hydra_command
from caption.runtime import configure_cpu

log = logging.getLogger(__name__)


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Caption every image `cfg.images` names; bad files are reported and skipped.

    Each output line is `{"image": path, "caption": str, "log_prob": float}`.

    Returns:
        `{"captioned": n, "failed": [paths]}`.
    """
    check_decoding(cfg)
    check_float(cfg, "temperature", 1e-6)
    check_int(cfg, "max_image_pixels", 1, optional=True)
    device = resolve_device(cfg.device)
    configure_cpu()
    model, vocab, train_cfg = load_captioner(cfg.checkpoint, device)
    files = expand_images(cfg.images)
    size = train_cfg.data.image_size
    captioned, failed = 0, []
    sink = open(cfg.output, "w") if cfg.output else nullcontext(sys.stdout)  # noqa: SIM115
    with sink as out:
        batches = caption_files(
            model,
            files,
            size,
            failed,
            batch_size=cfg.batch_size,
            device=device,
            max_pixels=cfg.max_image_pixels,
            strategy=cfg.strategy,
            beam_size=cfg.beam_size,
            max_len=cfg.max_len,
            temperature=cfg.temperature,
        )
        for good, gen in batches:
            for path, tokens, log_prob in zip(
                good, gen.tokens.tolist(), gen.log_probs.tolist(), strict=True
            ):
                out.write(caption_line(path, vocab.decode(tokens), log_prob))
            out.flush()
            captioned += len(good)
    log.info(
        "captioned %d image(s)%s%s",
        captioned,
        f", {len(failed)} failed" if failed else "",
        f"; wrote {Path(cfg.output)}" if cfg.output else "",
    )
    return {"captioned": captioned, "failed": failed}


@hydra_command("caption-generate", "generate")
def main(cfg: DictConfig) -> None:
    result = generate(cfg)
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

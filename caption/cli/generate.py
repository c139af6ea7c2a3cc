"""`caption-generate`: caption image files with a trained checkpoint, as JSON Lines."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from caption.config import check_decoding, check_float, check_int, decoding_options, resolve_device
from caption.data.images import expand_images
from caption.evaluation.decode import caption_files, caption_line
from caption.files import PartialLines
from caption.models.build import load_captioner
from caption.overrides import hydra_command
from caption.runtime import configure_cpu

log = logging.getLogger(__name__)


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Caption every image `cfg.images` names; bad files are reported and skipped.

    Each output line is `{"image": path, "caption": str, "log_prob": float}`. With `output=`,
    lines go to `<output>.partial` batch by batch, renamed to `output` once all are done; a
    write that fails (a full disk) keeps the whole lines so far there and says how many.

    Returns:
        `{"captioned": n, "failed": [paths]}`.
    """
    check_decoding(cfg)
    check_float(cfg, "temperature", 1e-6)
    check_int(cfg, "max_image_pixels", 1, optional=True)
    device = resolve_device(cfg.device)
    configure_cpu()
    model, vocab, _ = load_captioner(cfg.checkpoint, device)
    files = expand_images(cfg.images)
    captioned, failed = 0, []
    # A file grows under <output>.partial and gets its name when every image is done.
    with PartialLines(cfg.output, "captions") if cfg.output else _Stdout() as out:
        batches = caption_files(
            model,
            files,
            failed,
            batch_size=cfg.batch_size,
            device=device,
            max_pixels=cfg.max_image_pixels,
            temperature=cfg.temperature,
            **decoding_options(cfg),
        )
        for good, gen in batches:
            out.write(
                [
                    caption_line(path, vocab.decode(tokens), log_prob)
                    for path, tokens, log_prob in zip(
                        good, gen.tokens.tolist(), gen.log_probs.tolist(), strict=True
                    )
                ]
            )
            captioned += len(good)
    log.info(
        "captioned %d image(s)%s%s",
        captioned,
        f", {len(failed)} failed" if failed else "",
        f"; wrote {Path(cfg.output)}" if cfg.output else "",
    )
    return {"captioned": captioned, "failed": failed}


class _Stdout:
    """Caption lines to stdout, a batch at a time (the interface of `PartialLines`)."""

    def __enter__(self) -> _Stdout:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def write(self, lines: list[str]) -> None:
        sys.stdout.write("".join(lines))
        sys.stdout.flush()


@hydra_command("caption-generate", "generate")
def main(cfg: DictConfig) -> None:
    result = generate(cfg)
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
